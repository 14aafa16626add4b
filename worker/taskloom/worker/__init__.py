"""The taskloom worker runtime: connect to a supervisor and run subtasks.

from taskloom.worker import SubtaskContext, Worker

worker = Worker()

@worker.handler("shout")
async def shout(ctx: SubtaskContext) -> str:
    return ctx.instruction.upper()

worker.run()
"""

from taskloom.worker.context import SubtaskContext, SubtaskError
from taskloom.worker.handlers import HandlerRegistry
from taskloom.worker.settings import WorkerSettings
from taskloom.worker.worker import Worker

__all__ = ["HandlerRegistry", "SubtaskContext", "SubtaskError", "Worker", "WorkerSettings"]
