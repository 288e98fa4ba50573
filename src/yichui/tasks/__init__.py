"""The task engine: every long job (download, fine-tune, merge, evaluation) is a task.

``types`` names what can run, ``context`` is the API task code reports through, ``worker``
runs tasks from the queue, ``service`` is what the CLI and the API call. The Redis side lives
in :mod:`yichui.state.task_store`.
"""
