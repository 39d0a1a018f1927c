"""caprese.evaluation: score a model (dense, GRIFFIN/CATS baseline, a Caprese artifact) or an exported engine on
a math task.

Sits above calibration and the runtime; `caprese eval` is its command-line face.
"""

from caprese.evaluation.answers import extract_answer, is_correct
from caprese.evaluation.engine_eval import evaluate_engine
from caprese.evaluation.evaluate import EvalResult, ItemRecord, evaluate, extra_parameter_share
from caprese.evaluation.tasks import Task, load_task

__all__ = ["EvalResult", "ItemRecord", "Task", "evaluate", "evaluate_engine", "extra_parameter_share", "extract_answer",
           "is_correct", "load_task"]
