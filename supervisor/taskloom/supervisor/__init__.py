"""The taskloom supervisor: plans goals, schedules subtasks on workers, keeps state in Redis."""
