"""Errors a stage raises for bad input. The CLI prints the message (which names the
file, column or key) and exits non-zero, without a traceback."""


class StageError(RuntimeError):
    """A stage cannot go on; ``exit_code`` tells cron/Airflow which kind of failure."""

    exit_code = 3


class DataContractError(StageError):
    """Raw data breaks the contract beyond what quarantine can absorb."""

    exit_code = 4


class WarehouseLockedError(StageError):
    """Another run holds the warehouse's lock; try again when it has finished."""

    exit_code = 5
