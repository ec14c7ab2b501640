"""Every analysis script runs through its main(argv) on the smallest model."""

from analyses import inspect_model


def test_inspect_model_runs_on_a_local_checkpoint(hf_dirs, capsys):
    code = inspect_model.main(["--model", str(hf_dirs["llama"]), "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 layers x 4 heads (2 key/value heads)" in out
    assert out.count("copied by:") >= 1


def test_inspect_model_reports_bad_spec(capsys):
    assert inspect_model.main(["--model", "zoo:does-not-exist"]) == 2
    assert "unknown zoo model" in capsys.readouterr().err


def test_inspection_copy_events_are_real_copies(tiny_gqa):
    steps = inspect_model.compute_inspection(tiny_gqa, "a b c a b c a b", max_new_tokens=5)
    tokens = tiny_gqa.to_tokens("a b c a b c a b")[0].tolist()
    assert steps
    for step in steps:
        for _, _, pos in step.copying_heads:
            assert tokens[pos] == step.token_id
        tokens.append(step.token_id)


# ----------------------------------------------------------------------------- analyses.detect

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from analyses import bench_detect, detect  # noqa: E402
from rh_lens.models import save_model_dir  # noqa: E402
from rh_lens.results import import_reference_json, load_result  # noqa: E402
from tests.known_answer import build_copy_model  # noqa: E402


def detect_args(root, out, *extra):
    return ["--model", str(root / "model"), "--out", str(out),
            "--needles", str(root / "needles.jsonl"), "--haystack", str(root / "hay"),
            "--lengths", "80", "150", "--depths", "0", "100", "--buffer", "30",
            "--max-new-tokens", "5", "--quiet", *extra]


def test_detect_script_finds_the_known_copy_head(copy_inputs, tmp_path, capsys):
    assert detect.main(detect_args(copy_inputs, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "4 trials, 4 successful" in out
    first_row = out.split("active")[1].strip().splitlines()[0].split()
    assert first_row == ["L0H1", "1.000", "1.00"]
    scores = import_reference_json(tmp_path / "out" / "head_score.json")
    assert scores.shape == (4, 1, 4)
    np.testing.assert_array_equal(scores[:, 0, 1], 1.0)
    assert scores[:, 0, [0, 2, 3]].sum() == 0
    result = load_result(tmp_path / "out")
    assert result.kind == "detect" and result.meta["model_spec"].endswith("model")
    for name in ("heatmap.html", "niah_grid.html", "top_heads.html", "plotly.min.js",
                 "trials.jsonl"):
        assert (tmp_path / "out" / name).is_file()


def test_detect_script_can_write_self_contained_figures(copy_inputs, tmp_path):
    out = tmp_path / "out"
    assert detect.main(detect_args(copy_inputs, out, "--self-contained-figures")) == 0
    assert not (out / "plotly.min.js").exists()
    for name in ("heatmap.html", "niah_grid.html", "top_heads.html"):
        assert (out / name).stat().st_size > 1_000_000


def test_detect_script_writes_the_attention_scores(copy_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert detect.main(detect_args(copy_inputs, out)) == 0  # copy scores only, as before
    assert detect.main(detect_args(copy_inputs, out, "--score", "mass", "--extra-scores",
                                   "qr")) == 0
    printed = capsys.readouterr().out
    assert printed.split("active")[1].strip().splitlines()[0].split()[0] == "L0H1"
    result = load_result(out)
    for name in ("mean_mass", "trial_mass", "group_mass", "mean_qr", "trial_qr", "mean_step"):
        assert name in result.arrays, name
    assert result.summary["score"] == "mass"
    assert result.summary["scores"] == ["step", "set", "mass", "qr"]
    np.testing.assert_array_equal(import_reference_json(out / "head_score.json"),
                                  result.arrays["trial_mass"])
    for name in ("heatmap.html", "heatmap_qr.html"):
        assert (out / name).is_file()
    assert detect.main(["--merge", str(out), "--out", str(tmp_path / "m"), "--quiet",
                        "--score", "qr"]) == 0
    plain = tmp_path / "plain"
    assert detect.main(detect_args(copy_inputs, plain)) == 0
    assert detect.main(["--merge", str(plain), "--out", str(tmp_path / "m2"), "--quiet",
                        "--score", "qr"]) == 2
    assert "have no qr score" in capsys.readouterr().err


@pytest.mark.slow
def test_detect_shards_merge_to_the_same_aggregates(copy_inputs, tmp_path, capsys):
    assert detect.main(detect_args(copy_inputs, tmp_path / "full")) == 0
    for i in range(2):
        assert detect.main(detect_args(copy_inputs, tmp_path / f"s{i}", "--shard", f"{i}/2")) == 0
    assert detect.main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
                        "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    full, merged = load_result(tmp_path / "full"), load_result(tmp_path / "merged")
    for name in ("mean_step", "mean_set", "activation_frequency", "trial_step"):
        np.testing.assert_array_equal(full.arrays[name], merged.arrays[name])


def test_detect_script_reports_bad_needles(copy_inputs, tmp_path, capsys):
    bad = tmp_path / "needles.jsonl"
    bad.write_text('{"needle": "x"}\n')
    args = detect_args(copy_inputs, tmp_path / "out")
    args[args.index("--needles") + 1] = str(bad)
    assert detect.main(args) == 2
    assert "line 1: missing field" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_detect_prints_its_figures(hf_dirs, capsys):
    code = bench_detect.main(["--model", str(hf_dirs["llama"]), "--context", "200",
                              "--trials", "1", "--slow-trials", "1", "--repeats", "1",
                              "--chunk", "64", "--memory-contexts", "512",
                              "--engine-contexts", "256", "--backend", "bridge", "--skip-hf"])
    out = capsys.readouterr().out
    assert code == 0
    assert "backend bridge" in out
    assert "(a) detection" in out and "ratio" in out
    assert "(b) slow obvious implementation" in out and "speed-up" in out
    assert "512 tokens (2x): chunked" in out and "unchunked" in out
    assert "(d) engines" in out
    engines = [line.split() for line in out.splitlines()
               if line.strip().startswith(("hooked", "bridge,"))]
    assert [" ".join(row[:-3]) for row in engines] == list(bench_detect.ENGINES)
    assert all(float(row[-3]) > 0 and row[-1] == "MiB" for row in engines)


def test_bench_detect_times_the_default_sweep_against_hugging_face(hf_dirs, capsys):
    """Section (e) on a model whose tokenizer splits the zoo's needles finely (50 tokens, more
    than the old default sweep's shortest length left for them): one cell, every way."""
    import re

    import torch

    from rh_lens.benchmark import HF_FLOOR, REFERENCE_METHOD
    from rh_lens.models import BACKENDS, HAS_HOOKED

    threads = torch.get_num_threads()
    try:
        code = bench_detect.main(["--model", str(hf_dirs["llama"]), "--skip-speed",
                                  "--skip-memory", "--skip-engines", "--hf-every", "1000",
                                  "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(e) 1 trials of the default sweep" in out
    assert "(a)" not in out and "(c)" not in out and "(d)" not in out
    backends = [b for b in BACKENDS if b != "hooked" or HAS_HOOKED]
    labels = [f"{b}, batch {n}" for b in backends for n in (1, 8)] + [REFERENCE_METHOD,
                                                                       HF_FLOOR]
    row = re.compile(r"^ {4}(.+?) +([\d.]+) +([\d.]+)x ref +([\d.]+)x floor +\(([\d.]+)\)$")
    rows = {m[1]: [float(x) for x in m.groups()[1:]] for m in map(row.match, out.splitlines())
            if m}
    assert list(rows) == labels
    split = re.compile(r"^ {4}(.+?) +([\d.]+) +([\d.]+) +([\d.]+)$")
    phases = {m[1]: [float(x) for x in m.groups()[1:]] for m in map(split.match, out.splitlines())
              if m}
    assert list(phases) == labels[:-2]  # rh_lens's ways: prefill, steps, rest
    assert all(prefill > 0 and rest >= 0 for prefill, _, rest in phases.values())
    ref, floor = rows[REFERENCE_METHOD][0], rows[HF_FLOOR][0]
    for label, (ms, to_ref, to_floor, only_run) in rows.items():
        assert ms > 0 and ms == only_run, label  # one repeat: its median is that run
        # printed to 0.1 ms and 0.01x: the ratios agree up to that rounding
        assert to_ref == pytest.approx(ms / ref, rel=0.03, abs=0.006), label
        assert to_floor == pytest.approx(ms / floor, rel=0.03, abs=0.006), label
    assert rows[REFERENCE_METHOD][1] == rows[HF_FLOOR][2] == 1.0
    for b in backends:
        ((speedup, bound),) = re.findall(
            rf"^ {{4}}{b}: batch 8 is ([\d.]+)x faster than batch 1 \(at most ([\d.]+)x if its "
            r"decode steps took no time\)$", out, flags=re.MULTILINE)
        one, eight = rows[f"{b}, batch 1"][0], rows[f"{b}, batch 8"][0]
        assert float(speedup) == pytest.approx(one / eight, rel=0.03), b
        prefill, _, rest = phases[f"{b}, batch 8"]
        assert float(bound) == pytest.approx(one / (prefill + rest), rel=0.05, abs=0.01), b


def test_default_lengths_leave_room_for_the_longest_needle(hf_dirs, tokenizer):
    """The shortest default length holds buffer, needle and some haystack; every default
    length then builds, on a tokenizer that splits the zoo's needles into 50 tokens."""
    import argparse

    from analyses._cli import shortest_length, sweep_config
    from rh_lens.models import load_model
    from rh_lens.niah import BASE_TEMPLATE, build_trial
    from rh_lens.zoo.inputs import zoo_inputs

    model = load_model(hf_dirs["llama"])  # n_ctx 256: buffer 64, 32 new tokens
    needles, haystacks = zoo_inputs(3)
    longest = max(len(tokenizer.encode(" " + n.needle, add_special_tokens=False))
                  for n in needles)
    assert longest > 48
    question = max(len(tokenizer.encode(BASE_TEMPLATE.format(context="", question=n.question),
                                        add_special_tokens=False)) for n in needles)
    assert question + 32 > 64  # the question part and the new tokens overflow a quarter
    assert shortest_length(model, [], buffer=64, n_ctx=256) == 64 + 48
    assert shortest_length(model, needles, buffer=64, n_ctx=256) == 64 + longest + 16
    assert shortest_length(model, needles, buffer=0, n_ctx=1024) == 1024 // 8
    with pytest.raises(ValueError, match=f"longest needle takes {longest} tokens"):
        shortest_length(model, needles, buffer=200, n_ctx=256)
    args = argparse.Namespace(lengths=None, depths=[0.0, 100.0], buffer=None,
                              max_new_tokens=None, chat=False, chunk=64, batch=1)
    cfg = sweep_config(model, args, points=10, needles=needles)
    assert (cfg.buffer, cfg.max_new_tokens) == (1 + question + 4 + 32, 32)
    assert cfg.lengths[0] == cfg.buffer + longest + 16 and cfg.lengths[-1] == 256
    for length in cfg.lengths:  # the old defaults (buffer 64 from length 112) failed both ends
        for i, needle in enumerate(needles):
            for depth in cfg.depths:
                build_trial(model, needle, haystacks[i], context_length=length, depth=depth,
                            buffer=cfg.buffer, max_new_tokens=cfg.max_new_tokens)


def test_detect_refuses_to_resume_with_other_weights_under_the_same_name(
        copy_inputs, tokenizer, tmp_path, capsys):
    """A model retrained and saved where the old one was: the rerun must not reuse its cells."""
    import torch

    from rh_lens.models import load_model, weights_fingerprint

    (word_id,) = tokenizer.encode(" secret", add_special_tokens=False)
    model = build_copy_model(tokenizer, [word_id], copy_head=1)
    args = detect_args(copy_inputs, tmp_path / "out")
    args[args.index("--model") + 1] = str(tmp_path / "model")
    save_model_dir(tmp_path / "model", cfg=model.cfg, state_dict=model.state_dict(),
                   tokenizer=tokenizer)
    assert detect.main(args) == 0
    cells = sorted((tmp_path / "out" / "cells").glob("*.json"))
    before = weights_fingerprint(load_model(str(tmp_path / "model")))
    assert before == weights_fingerprint(load_model(str(tmp_path / "model")))
    with torch.no_grad():
        model.blocks[0].attn.W_O[0, 0, 0] += 1e-3
    save_model_dir(tmp_path / "model", cfg=model.cfg, state_dict=model.state_dict(),
                   tokenizer=tokenizer)
    assert weights_fingerprint(load_model(str(tmp_path / "model"))) != before
    assert detect.main(args) == 2
    assert "differs in: weights" in capsys.readouterr().err
    assert sorted((tmp_path / "out" / "cells").glob("*.json")) == cells  # nothing lost


def test_default_sweep_buffer_holds_the_chat_template_too():
    """analyses.detect and analyses.ablate size their default buffer alike: with --chat it holds
    the template's own tokens on top of question and answer."""
    import argparse

    from analyses._cli import sweep_buffer
    from rh_lens.models import load_model
    from rh_lens.niah import chat_overhead
    from rh_lens.zoo.inputs import zoo_inputs

    model = load_model("zoo:llama-s-chat")
    extra = chat_overhead(model)
    assert extra > 0

    def args(**kw):
        return argparse.Namespace(**({"buffer": None, "max_new_tokens": None, "chat": False} | kw))

    assert sweep_buffer(model, args(), 256) == (64, 32)
    assert sweep_buffer(model, args(chat=True), 256) == (64 + extra, 32)
    assert sweep_buffer(model, args(chat=True, buffer=30, max_new_tokens=7), 256) == (30, 7)
    assert sweep_buffer(model, args(), 4096) == (200, 50)
    # the zoo's questions and new tokens fit in the quarter: its defaults stay as they were
    needles = zoo_inputs(12)[0]
    assert sweep_buffer(model, args(), 256, needles=needles) == (64, 32)
    assert sweep_buffer(model, args(chat=True), 256, needles=needles) == (64 + extra, 32)


def test_an_incomplete_merge_is_refused_unless_allowed(copy_inputs, tmp_path, capsys):
    """Shard 0 of 2 alone is half a sweep: merged, it is refused, naming the missing cells;
    with --allow-partial it is written and marked partial."""
    assert detect.main(detect_args(copy_inputs, tmp_path / "s0", "--shard", "0/2")) == 0
    merge = ["--merge", str(tmp_path / "s0"), "--out", str(tmp_path / "m"), "--quiet"]
    assert detect.main(merge) == 2
    err = capsys.readouterr().err
    assert "2 of the sweep's 4 cells; missing 2: n000_L0000080_d100.00" in err
    assert not (tmp_path / "m" / "result.json").exists()
    assert detect.main([*merge, "--allow-partial"]) == 0
    saved = load_result(tmp_path / "m")
    assert saved.summary["n_trials"] == 2
    assert len(saved.summary["partial"]["missing_cells"]) == 2
    assert saved.meta["extra"]["partial"] is True


def test_repeated_grid_values_and_zero_new_tokens_are_refused(copy_inputs, tmp_path, capsys):
    args = detect_args(copy_inputs, tmp_path / "out")
    repeated = [*args[:args.index("--depths")], "--depths", "50", "50.0",
                *args[args.index("--buffer"):]]
    assert detect.main(repeated) == 2
    assert "depths repeat [50.0]" in capsys.readouterr().err
    zero = list(args)
    zero[zero.index("--max-new-tokens") + 1] = "0"
    assert detect.main(zero) == 2
    assert "max_new_tokens must be positive, got 0" in capsys.readouterr().err


def test_a_refused_run_does_not_block_its_corrected_retry(copy_inputs, tmp_path, capsys):
    """A sweep refused before its first cell leaves only its identity file; the corrected
    command into the same directory runs."""
    args = detect_args(copy_inputs, tmp_path / "out")
    too_long = list(args)
    too_long[too_long.index("--lengths") + 1] = "100000"
    assert detect.main(too_long) == 2
    capsys.readouterr()
    assert (tmp_path / "out" / "sweep.json").is_file()  # written, with no cell
    assert detect.main(args) == 0
    assert "4 trials, 4 successful" in capsys.readouterr().out


def test_a_result_records_its_command_line(copy_inputs, tmp_path, monkeypatch):
    args = detect_args(copy_inputs, tmp_path / "out")
    monkeypatch.setattr("sys.argv", ["analyses/detect.py", *args])
    assert detect.main() == 0
    assert load_result(tmp_path / "out").meta["argv"] == args


def test_ctrl_c_prints_one_line_and_how_to_resume(capsys):
    from analyses._cli import run_guarded

    def interrupted(args, argv):
        raise KeyboardInterrupt

    assert run_guarded(interrupted, None, []) == 130
    assert capsys.readouterr().err.strip() == (
        "interrupted: every finished cell is saved; rerun the same command to resume")


def test_a_damaged_cell_is_named_and_recomputed_on_request(copy_inputs, tmp_path, capsys):
    """A truncated cell .npz and a cell .json without its fields stop a resume with one line
    naming the file; --recompute-bad-cells computes them again, to the same result."""
    out = tmp_path / "out"
    assert detect.main(detect_args(copy_inputs, out)) == 0
    before = (out / "head_score.json").read_bytes()
    cells = sorted((out / "cells").glob("*.npz"))
    cells[0].write_bytes(cells[0].read_bytes()[:30])
    cells[1].with_suffix(".json").write_text('{"record_format": 1}')
    capsys.readouterr()
    assert detect.main(detect_args(copy_inputs, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert cells[0].name in err and "--recompute-bad-cells" in err
    assert detect.main(detect_args(copy_inputs, out, "--recompute-bad-cells")) == 0
    assert (out / "head_score.json").read_bytes() == before
