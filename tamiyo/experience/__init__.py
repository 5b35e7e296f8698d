"""Experience store: SQLite (WAL) log of decisions and outcomes, one format, one reader."""

from tamiyo.experience.reader import ExperienceReader, Transition, derived_reward, store_files
from tamiyo.experience.schema import (
    ACTION_LOAD_KERNEL,
    ACTION_NO_OP,
    SCHEMA_VERSION,
    DecisionRecord,
    ExperienceStoreError,
    OutcomeRecord,
    PartsDecision,
    StateParts,
    connect,
)
from tamiyo.experience.writer import ExperienceWriter

__all__ = [
    "ACTION_LOAD_KERNEL",
    "ACTION_NO_OP",
    "SCHEMA_VERSION",
    "DecisionRecord",
    "ExperienceReader",
    "ExperienceStoreError",
    "ExperienceWriter",
    "OutcomeRecord",
    "PartsDecision",
    "StateParts",
    "Transition",
    "connect",
    "derived_reward",
    "store_files",
]
