"""The one error type of dataset/: bad split files, missing data, unreadable masks."""


class DatasetError(Exception):
    """A one-line message naming the file (and line) at fault."""
