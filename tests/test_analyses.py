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
