"""OpenAI's grader types (string_check, text_similarity, python, score_model, label_model, multi), their
validation and the sandbox python graders run in. docs/graders.md describes each type and where tunekit
differs from OpenAI; docs/security.md the sandbox.

    problems = check_grader(grader, item_keys={"answer"})       # [] when valid; every problem at once
    with PythonSandbox(workers=2) as sandbox:
        result = grade(grader, make_sample('{"answer": "4"}'), {"answer": "4"}, judge=judge, sandbox=sandbox)
    result.reward, result.passed, result.errors
"""

from tunekit.errors import Problem
from tunekit.eval.graders.check import TYPES, check_grader, leaf_graders, multi_graders
from tunekit.eval.graders.formula import FormulaError, evaluate, parse_formula
from tunekit.eval.graders.grade import (
    ERROR_DETAILS,
    ERROR_FLAGS,
    GradeResult,
    Judge,
    JudgeReply,
    empty_errors,
    grade,
    pass_threshold,
)
from tunekit.eval.graders.sandbox import PythonSandbox, SandboxError
from tunekit.eval.graders.similarity import METRICS, similarity
from tunekit.eval.graders.template import make_sample, render

__all__ = [
    "ERROR_DETAILS", "ERROR_FLAGS", "METRICS", "TYPES", "FormulaError", "GradeResult", "Judge", "JudgeReply",
    "Problem", "PythonSandbox", "SandboxError", "check_grader", "empty_errors", "evaluate", "grade", "leaf_graders",
    "make_sample", "multi_graders", "parse_formula", "pass_threshold", "render", "similarity",
]
