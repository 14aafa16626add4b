"""The taskloom client SDK and CLI.

from taskloom.client import TaskloomClient

async with TaskloomClient("127.0.0.1:50051") as client:
    task = await client.wait(await client.submit("Plan a three-day trip to Lisbon"))
    print(task.result)
"""

from taskloom.client.client import Submitted, SyncTaskloomClient, TaskloomClient
from taskloom.client.settings import ClientSettings

__all__ = ["ClientSettings", "Submitted", "SyncTaskloomClient", "TaskloomClient"]
