"""The one error type of dataset/: bad split files, missing data, unreadable masks."""

_WORKER_HEADER = "Caught DatasetError"


class DatasetError(Exception):
    """A one-line message naming the file (and line) at fault; str() is that line, also when a DataLoader worker
    raised it.

    A DataLoader re-raises a worker's exception as the same type built from "Caught DatasetError in DataLoader worker
    process N.\\nOriginal Traceback ...\\ndataset.errors.DatasetError: <message>". The original message is the last
    line of that text, so it is recovered here and the traceback kept in `worker_traceback` for debugging.
    """

    def __init__(self, message: str):
        self.worker_traceback: str | None = None
        if message.startswith(_WORKER_HEADER) and "\n" in message:
            self.worker_traceback = message
            last_line = message.rstrip("\n").rsplit("\n", 1)[-1]
            message = last_line.partition(": ")[2] or last_line
        super().__init__(message)
