"""The training benchmark."""

import pytest
import torch


@pytest.mark.slow
def test_bench_train_times_every_stage_and_sums_them(capsys):
    import dataclasses

    from rh_lens.zoo.training import bench as bench_train
    from rh_lens.zoo.training.recipes import Polish, get_recipe

    r = dataclasses.replace(get_recipe("micro"), steps=6, finetune_steps=2,
                            polish=Polish(steps=3), stages=(Polish(steps=1, lr=1e-4),))
    assert bench_train.stages(r) == [("copy warm-up", 0, 2), ("main", 2, 4), ("fine-tuning", 6, 2),
                                     ("polish", 8, 3), ("stage 1", 11, 1)]
    assert sum(n for _, _, n in bench_train.stages(r)) == r.total_steps
    rows, totals = bench_train.bench(r, n=1)
    assert [label for label, _, _ in rows] == [label for label, _, _ in bench_train.stages(r)]
    assert all(sec > 0 for _, _, sec in rows)
    assert totals == [pytest.approx(sum(n * sec for _, n, sec in rows))]
    rows, totals = bench_train.bench(r, n=1, live=True)
    assert all(len(row) == 4 and row[3] > 0 for row in rows) and len(totals) == 2
    assert totals[1] == pytest.approx(sum(row[1] * row[3] for row in rows))
    assert bench_train.main(["micro", "--threads", "1", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "micro (4 steps)" in out and "copy warm-up" in out and "min target)" in out
    assert "kernels), 1 thread(s)" in out and torch.__version__ in out  # the machine it held on
    assert "live logits" not in out
    assert bench_train.main(["micro", "--threads", "1", "--steps", "1", "--live-logits"]) == 0
    out = capsys.readouterr().out
    assert "total with live logits" in out and "x faster" in out
    with pytest.raises(ValueError, match="unknown zoo recipe"):
        bench_train.main(["no-such-model"])
