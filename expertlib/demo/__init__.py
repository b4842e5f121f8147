"""The built-in demo: toy tasks, a small pretrained MoE base, evaluation, and `expertlib demo`.

    from expertlib.demo import build_demo_base, run_demo, DemoSettings
    from expertlib.demo.evaluate import evaluate
    base = build_demo_base(quick=True)           # cached under $EXPERTLIB_CACHE/demo/
    evaluate(base, ["caesar.safetensors"]).rows()
    run_demo(DemoSettings(quick=True))           # what `expertlib demo --quick` does

Modules: `tasks` (generators, splits, scorer, jsonl), `base` (demo base model), `evaluate`
(exact-match accuracy of a base and its expert sets), `run` (the demo pipeline). The function
`evaluate` is not re-exported here: it would hide the module of the same name.
"""

from expertlib.demo.base import QUICK_CONFIG, DemoBaseConfig, build_demo_base, demo_base_info
from expertlib.demo.evaluate import EvalResult
from expertlib.demo.run import DemoReport, DemoSettings, run_demo
from expertlib.demo.tasks import GENERAL_TASKS, SPECIALISED_TASKS, TASKS, get_task

__all__ = [
    "GENERAL_TASKS",
    "QUICK_CONFIG",
    "SPECIALISED_TASKS",
    "TASKS",
    "DemoBaseConfig",
    "DemoReport",
    "DemoSettings",
    "EvalResult",
    "build_demo_base",
    "demo_base_info",
    "get_task",
    "run_demo",
]
