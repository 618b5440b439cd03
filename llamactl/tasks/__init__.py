"""The verifiable task suite: generated tasks a tiny model can learn and a program can grade.

Families (arithmetic, copy, reverse, sort, count, facts about invented people, benign how-to requests
and unsafe requests worded alike) are in `families`; their scorers, the simulated annotator's ground truth, in `scoring`; the annotator's graded judgement
and the paper's four ratings in `annotator`; Ghost Attention's
checkable constraints in `constraints`; writing and reading a suite directory in `suite`.
"""
from llamactl.tasks.families import FAMILIES, REFUSALS, Family, TaskParams
from llamactl.tasks.scoring import is_refusal, normalize, score, score_responses
from llamactl.tasks.suite import (SuiteConfig, build_suite, load_items, read_manifest, suite_items,
                                  write_suite)

__all__ = ["FAMILIES", "REFUSALS", "Family", "TaskParams", "is_refusal", "normalize", "score",
           "score_responses", "SuiteConfig", "build_suite", "load_items", "read_manifest", "suite_items",
           "write_suite"]
