"""rh_lens.benchmark: the figures are consistent, the memory probe runs in a fresh process, bad
input is refused."""

import pytest

from rh_lens import benchmark
from rh_lens.zoo.inputs import zoo_inputs


def test_median_seconds_warms_up_once_and_takes_the_median():
    calls = []
    seconds = benchmark.median_seconds(lambda: calls.append(1), repeats=3)
    assert len(calls) == 4 and seconds >= 0
    with pytest.raises(ValueError, match="repeats must be positive"):
        benchmark.median_seconds(lambda: None, repeats=0)


@pytest.fixture(scope="module")
def zoo_model():
    from rh_lens.models import load_model

    return load_model("zoo:llama-s")


def test_speed_figures_are_consistent(zoo_model):
    needles, haystacks = zoo_inputs(2, seed=7)
    speed = benchmark.measure_speed(zoo_model, needles, haystacks, context=160, repeats=1,
                                    slow_trials=1)
    cfg = benchmark.detection_config(zoo_model, context=160)
    assert speed.context == 160 and speed.trials == 2
    assert 1 <= speed.new_tokens_per_trial <= cfg.max_new_tokens
    assert min(speed.detect_s_per_trial, speed.plain_generation_s_per_trial,
               speed.slow_s_per_trial) > 0
    assert speed.overhead_ratio == speed.detect_s_per_trial / speed.plain_generation_s_per_trial
    assert speed.speedup_vs_slow == speed.slow_s_per_trial / speed.detect_s_per_trial
    with pytest.raises(ValueError, match="slow_trials must be in 1..2"):
        benchmark.measure_speed(zoo_model, needles, haystacks, context=160, repeats=1,
                                slow_trials=3)
    with pytest.raises(ValueError, match="one haystack per needle"):
        benchmark.detect_seconds(zoo_model, needles, haystacks[:1], context=160, repeats=1)


def test_memory_probe_runs_in_a_fresh_process(hf_dirs):
    rows = benchmark.measure_memory(str(hf_dirs["llama"]), native=128, contexts=[128],
                                    chunk=32, device="cpu", engine={"backend": "bridge"})
    assert [(r.context, r.x_native) for r in rows] == [(128, 1.0)]
    assert rows[0].chunked_bytes >= 0 and rows[0].unchunked_bytes >= 0
    with pytest.raises(RuntimeError, match="memory probe failed"):
        benchmark.probe_memory(str(hf_dirs["llama"] / "missing"), n_ctx=128, context=160,
                               chunk=64, device="cpu", engine={"backend": "bridge"})
