"""The user-facing surface: --help on every entry point lists every knob with its help,
and every markdown table in README and docs/ has as many cells in each row as in its
header (an unescaped | inside a cell would split it)."""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import analyze
import bench
import cards
import compare
import configurator
import eval as eval_cli
import sample
import simulate
import train
from model import GPTConfig
from moe import MoEConfig
from training import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(os.path.dirname(path)) + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry_points():
    """(name, main, the config classes whose knobs its --help must list)."""
    facts = load_script(os.path.join(ROOT, "data", "facts", "prepare.py"))
    text = load_script(os.path.join(ROOT, "data", "text", "prepare.py"))
    evaluate = load_script(os.path.join(ROOT, "data", "facts", "evaluate.py"))
    return [("train.py", train.main, [TrainConfig, GPTConfig, MoEConfig]),
            ("sample.py", sample.main, [sample.SampleConfig]),
            ("eval.py", eval_cli.main, [eval_cli.EvalConfig]),
            ("analyze.py", analyze.main, [analyze.AnalysisConfig]),
            ("bench.py", bench.main, [bench.BenchConfig]),
            ("compare.py", compare.main, [compare.CompareConfig]),
            ("compare.py study", lambda argv: compare.main(["study"] + argv), [compare.StudyConfig]),
            ("simulate.py", simulate.main, [simulate.SimConfig]),
            ("cards.py", cards.main, [cards.CardsConfig]),
            ("data/facts/prepare.py", facts.main, [facts.PrepareConfig]),
            ("data/text/prepare.py", text.main, [text.TextConfig]),
            ("data/facts/evaluate.py", evaluate.main, [evaluate.EvalConfig])]


@pytest.mark.parametrize("name, main, classes", entry_points(), ids=lambda v: v if isinstance(v, str) else "")
def test_help_lists_every_knob_with_its_help(name, main, classes, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    listed = {}
    for line in out.splitlines():
        m = re.match(r'  --(\w+)=("[^"]*"|\S*)(?:\s+(.*))?$', line)
        if m:       # group 3 is None for a long default: the help is on the next line
            listed[m.group(1)] = m.group(3)
    knobs = [f for cls in classes for f in configurator.knobs(cls)]
    assert set(listed) == {f.name for f in knobs}, name
    for f in knobs:
        assert f.metadata["help"].strip()
        assert listed[f.name] is None or f.metadata["help"].split()[0] in listed[f.name], f.name
        if "choices" in f.metadata:              # the allowed values are printed with the help
            assert " | ".join(map(str, f.metadata["choices"])) in " ".join(out.split()), f.name


def test_help_works_as_a_command():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--table_optimizer=adamw" in out.stdout and not out.stderr


def markdown_files():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def cells(row):
    """The cells of a table row: split at the | that are not escaped."""
    return re.split(r"(?<!\\)\|", row.strip().strip("|"))


@pytest.mark.parametrize("path", markdown_files(), ids=os.path.basename)
def test_markdown_tables_have_the_header_s_number_of_cells(path):
    lines = open(path, encoding="utf-8").read().splitlines()
    in_code = False
    header = None
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("|"):
            header = None
            continue
        if header is None:
            header = len(cells(line))
        else:
            assert len(cells(line)) == header, f"{os.path.basename(path)}:{number}: {len(cells(line))} cells, " \
                                               f"the header has {header}"


def test_readme_card_table_is_what_the_command_prints():
    """README's card rows are cards.py's on the Zipf estimate (dry runs: nothing allocated)."""
    table = cards.format_table(cards.card_rows(["none"]))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert table in f.read()
    # and each recipe fits the card it names
    assert all(float(device) <= float(limit) for _, _, _, device, limit, *_ in cards.card_rows(["none"]))
