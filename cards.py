"""
The card table: which config fits which card, from the memory plans of the recipes'
dry runs (CUDA, bf16 autocast), on the planner's Zipf estimate and on a prepared dataset.

    python cards.py                    # Zipf estimate and data/text (where prepared)
    python cards.py --datasets=none    # the Zipf estimate only: no data needed

A card's limit is its capacity less 2 GiB for the CUDA context and fragmentation and about
2 GiB of headroom. Nothing is allocated.
"""

import sys
from dataclasses import dataclass

import configurator
import data
import training
from configurator import UsageError, knob
from model import GPTConfig
from moe import MoEConfig

GiB = 2 ** 30
# (card, its limit in GiB, config file and flags)
RECIPES = [
    ("80 GB", 76.0, ["config/stem_350m.py"]),
    ("24 GB", 22.0, ["config/stem_350m_24gb.py"]),
    ("80 GB", 76.0, ["config/stem_1b.py"]),
]


@dataclass
class CardsConfig:
    datasets: str = knob("none,text", help="comma-separated datasets to plan on; none: the Zipf estimate")


def plan_recipe(args, dataset):
    """(device GiB, host GiB, tokens per step) of a recipe's CUDA dry run on `dataset`."""
    overrides = configurator.parse(args + ["--device=cuda", f"--dataset={dataset}"], training.TrainConfig,
                                   GPTConfig, MoEConfig)
    train_overrides, model_overrides = configurator.split_overrides(overrides, training.TrainConfig)
    tc = configurator.build(training.TrainConfig, **train_overrides)
    p, config, _ = training.plan_of(tc, model_overrides)
    return p.total("device") / GiB, p.total("host") / GiB, tc.batch_size * tc.grad_accum_steps * config.block_size


def card_rows(datasets):
    rows = []
    for card, limit, args in RECIPES:
        for dataset in datasets:
            if dataset != "none" and data.read_meta(dataset) is None:
                continue
            device, host, tokens = plan_recipe(args, dataset)
            estimate = "Zipf estimate" if dataset == "none" else dataset
            rows.append((card, " ".join(args), estimate, f"{device:.2f}", f"{limit:.0f}",
                         "yes" if device <= limit else "no", f"{host:.2f}", f"{tokens:,}"))
    return rows


def format_table(rows):
    lines = ["| card | config | rows in flight from | device GiB | limit GiB | fits | host GiB | tokens per step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        cc = CardsConfig(**configurator.parse(argv, CardsConfig, doc=__doc__))
        print(format_table(card_rows([d.strip() for d in cc.datasets.split(",") if d.strip()])))
    except UsageError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
