"""bench.py: the train and decode modes on the CPU, the drift-corrected time ratio, and
the timing in fresh processes."""

import statistics

import pytest
import torch

import bench


def test_train_and_decode_modes_run_on_cpu(capsys):
    runners = bench.main(["--mode=train", "--steps=1", "--rounds=2", "--warmup=1", "--batch_size=2", "--device=cpu"])
    assert [r.name for r in runners] == ["dense", "stem-full adamw", "stem-full resident", "stem-full offload"]
    # the dense model's last round closes the run: every other model's round lies between two of
    # dense's, and its ratio is set against them
    dense_times = [t for t, _ in runners[0].rounds]
    assert len(dense_times) == 3 and all(len(r.rounds) == 2 for r in runners[1:])
    assert all(dense_times[k] < r.rounds[k][0] < dense_times[k + 1] for r in runners[1:] for k in range(2))
    assert runners[0].ratio == 1.0
    assert runners[2].ratio == bench.drift_corrected_ratio(runners[2].rounds, runners[0].rounds)
    # resident and offloaded lazy-AdamW runners saw the same batches: the same tables after
    # (to float tolerance: Adam turns last-bit differences into ~1e-6 ones within two steps)
    tables = [r.raw_model.tables.tensors()["weight"] for r in runners[2:]]
    assert torch.equal(tables[1], tables[0])
    assert not torch.equal(tables[0], runners[1].raw_model.tables.weight)     # dense AdamW moves every row
    results = bench.main(["--mode=decode", "--new_tokens=4", "--rounds=1", "--warmup=1", "--prompt_tokens=16",
                          "--batch_size=2", "--device=cpu"])
    assert set(results) == {"resident", "offload"}
    assert "offloaded tokens identical to resident: True" in capsys.readouterr().out


def test_drift_corrected_ratio_cancels_a_linear_drift_and_ignores_a_burst_in_one_model_round():
    slowdown = lambda t: 1 + 0.04 * t                  # the machine slows by 4% a second
    dense = [(t, 2.0 * slowdown(t)) for t in (0.0, 10.0, 20.0, 30.0)]     # the last dense round closes the run
    model = [(t, 1.8 * slowdown(t)) for t in (5.0, 12.5, 27.0)]         # truly 0.9 of the dense step
    assert bench.drift_corrected_ratio(model, dense) == pytest.approx(0.9, rel=1e-12)
    # medians of all steps against each other keep the drift in
    naive = statistics.median(s for _, s in model) / statistics.median(s for _, s in dense)
    assert abs(naive - 0.9) > 0.05
    # a round that ran during a burst of neighbours' load is one sample of three: the median drops it
    model[1] = (12.5, 1.8 * slowdown(12.5) * 1.5)
    assert bench.drift_corrected_ratio(model, dense) == pytest.approx(0.9, rel=1e-12)
    with pytest.raises(ValueError, match="no dense round before and after"):
        bench.drift_corrected_ratio([(31.0, 2.0)], dense)


def test_train_mode_in_fresh_processes_reports_the_median_of_their_ratios(capfd):
    # capfd, not capsys: the spawned processes write to the file descriptor they inherit
    ratios = bench.main(["--mode=train", "--steps=1", "--rounds=1", "--warmup=1", "--batch_size=2",
                         "--device=cpu", "--tables=resident", "--processes=3"])
    out = capfd.readouterr().out
    assert list(ratios) == ["dense", "stem-full adamw", "stem-full resident"]
    assert all(len(values) == 3 for values in ratios.values())
    assert ratios["dense"] == [1.0, 1.0, 1.0]
    # the summary line is the median of the per-process ratios that each process's table printed
    printed = [float(line.split()[-3]) for line in out.splitlines()     # the per-process table rows
               if line.startswith("stem-full resident ") and len(line.split()) == 10]
    assert len(printed) == 3
    assert [round(v, 3) for v in ratios["stem-full resident"]] == printed
    summary = next(line for line in out.splitlines() if line.startswith("stem-full resident") and "(" in line)
    assert float(summary.split()[2]) == round(statistics.median(printed), 3)
    with pytest.raises(SystemExit, match="'processes' must be >= 1"):
        bench.main(["--mode=train", "--processes=0"])
