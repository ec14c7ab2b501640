"""The bundled zoo models: each loads offline through ``load_model("zoo:NAME")`` and answers
NIAH prompts built from held-out needle templates."""

import random

import numpy as np
import pytest
import torch

from rh_lens.zoo import PACKAGE_MODELS, tasks
from rh_lens.zoo.training.recipes import ZOO_NAMES, get_recipe

pytestmark = pytest.mark.tl4

# llama-s is the embedded default: it must be present.  The others are checked when built.
REQUIRED = ("llama-s",)


def _greedy_line(model, prompt: str, max_new_tokens: int = 24) -> str:
    tokens = model.to_tokens(prompt, truncate=False)
    assert tokens.shape[1] + max_new_tokens <= model.cfg.n_ctx
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(tokens)[0, -1].argmax())
            new.append(nxt)
            tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
            if "\n" in model.tokenizer.decode([nxt]):
                break
    return model.tokenizer.decode(new)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_shipped_weights_come_from_the_recipe_in_the_tree(name):
    """The card records the recipe the weights were trained with: it must be the one that
    ``python -m rh_lens.zoo.training.train NAME`` runs, to the last step."""
    import json

    card_path = PACKAGE_MODELS / name / "card.json"
    if not card_path.is_file():
        pytest.skip(f"zoo model {name} has not been trained yet")
    card = json.loads(card_path.read_text())
    recipe = get_recipe(name)
    assert card["recipe"] == recipe.to_json()
    assert card["steps"] == recipe.total_steps
    assert card["evaluation"]["n_ctx"] == recipe.n_ctx


@pytest.mark.parametrize("name", [n for n in ZOO_NAMES if get_recipe(n).parent is not None])
def test_a_shipped_child_was_trained_from_the_shipped_parent(name):
    """A child (continued pretraining, chat finetuning) starts from its parent's packaged
    weights, and its card keeps that file's SHA-256: retraining the parent without its children
    leaves them describing a model that is no longer shipped."""
    import json

    from rh_lens.zoo.training.train import file_sha256

    card_path = PACKAGE_MODELS / name / "card.json"
    if not card_path.is_file():
        pytest.skip(f"zoo model {name} has not been trained yet")
    parent = get_recipe(name).parent
    card = json.loads(card_path.read_text())
    if "parent_sha256" not in card:
        pytest.skip(f"{name}'s card predates the parent's digest: retrain it to record one")
    assert card["parent_sha256"] == file_sha256(PACKAGE_MODELS / parent / "model.safetensors"), \
        f"{name} was trained from another {parent} than the one shipped: retrain it"


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.slow
def test_zoo_model_loads_and_answers_heldout_niah(name):
    if not (PACKAGE_MODELS / name / "config.json").is_file():
        if name in REQUIRED:
            pytest.fail(f"the default zoo model {name} is missing from the package")
        pytest.skip(f"zoo model {name} has not been trained yet")
    from rh_lens.models import load_model

    model = load_model(f"zoo:{name}")
    weights = PACKAGE_MODELS / name / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    chat = model.tokenizer.chat_template is not None
    rng = random.Random(f"test:{name}")
    n_ctx = min(model.cfg.n_ctx, 256)
    # 12 prompts, not 3: a model right 91 % of the time at this length (llama-s-chat, which
    # missed 2 of the 3 this seed drew) fails 2 % of 3-prompt draws and would still pass most
    # draws at 70 %; more than a quarter of 12 missed says the model is broken.
    hits = 0
    depths = (0.0, 0.5, 1.0) * 4
    for depth in depths:
        ex = tasks.niah_example(rng, tokenizer=model.tokenizer.backend_tokenizer,
                                n_haystack_tokens=n_ctx - 96, depth=depth,
                                templates=tasks.HELDOUT_TEMPLATES)
        if chat:  # the tokenizer's own chat template builds the same prompt
            context, question = ex.prompt[: -len(tasks.ANSWER_PREFIX)].rsplit(
                tasks.QUESTION_PREFIX, 1)
            ex = tasks.to_chat(ex)
            messages = [{"role": "user", "content": tasks.chat_user_text(context, question)}]
            assert model.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True) == ex.prompt
        out = _greedy_line(model, ex.prompt)
        out = out.removeprefix("Answer:")
        hits += out.strip() == ex.answer
    assert hits >= 9, f"{name} answered {hits}/{len(depths)} held-out NIAH prompts"


def _detect(model, needles):
    """A small detection sweep: 2 lengths x 3 depths per needle, one prose haystack."""
    from rh_lens.detect import DetectConfig, compute_detect
    from rh_lens.niah import TextHaystack
    from rh_lens.zoo.prose import Prose

    haystack = TextHaystack(Prose(5).text(n_chars=6000))
    cfg = DetectConfig(lengths=(120, 240), depths=(0.0, 50.0, 100.0), buffer=48,
                       max_new_tokens=12, chunk_size=64)
    return compute_detect(model, needles, [haystack] * len(needles), cfg, progress=False)


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.slow
def test_zoo_model_detection_is_identical_on_both_backends(name):
    """Same generated tokens, per-head argmax positions and retrieval scores from the
    HookedTransformer and from the Bridge around the converted Hugging Face model (fast
    prefill on)."""
    from rh_lens.models import HAS_HOOKED, load_model
    from rh_lens.niah import Needle

    if not HAS_HOOKED:
        pytest.skip("needs transformer-lens 3.x (both backends)")
    if not (PACKAGE_MODELS / name / "config.json").is_file():
        pytest.skip(f"zoo model {name} has not been trained yet")
    models = [load_model(f"zoo:{name}"), load_model(f"zoo:{name}", backend="bridge")]
    needles = [
        # held-out phrasings in the zoo's words (unseen words: the test below)
        Needle("The favourite song of Mara is the quiet lantern of Fenwick.",
               "What is the favourite song of Mara?", "the quiet lantern of Fenwick"),
        Needle("The prize at the fair in Caldera was a rusty golden kettle.",
               "What was the prize at the fair in Caldera?", "a rusty golden kettle"),
    ]
    hooked, bridge = (_detect(m, needles) for m in models)
    assert len(bridge.records) == 12 and hooked.n_success >= 6
    for a, b in zip(hooked.records, bridge.records, strict=True):
        assert (a.generated, a.success) == (b.generated, b.success)
        for field in ("tokens", "positions", "step_score", "set_score"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(hooked.mean_scores("step"), bridge.mean_scores("step"))


@pytest.mark.slow
def test_the_default_copies_answers_of_words_it_never_saw():
    """Needles whose answers are words outside the zoo's generators (several tokens each): a
    polish that over-fitted the zoo's answer formats copied them only in part (2 of 12 trials
    succeeded, against 9 before it; the shipped model: 11)."""
    from rh_lens.models import load_model
    from rh_lens.niah import Needle

    model = load_model("zoo:llama-s")
    needles = [
        Needle("The secret ingredient of Mara's soup is purple ginger and sea salt.",
               "What is the secret ingredient of Mara's soup?", "purple ginger and sea salt"),
        Needle("The colour of Ivo's boat is pale green.", "What is the colour of Ivo's boat?",
               "pale green"),
    ]
    result = _detect(model, needles)
    assert result.n_success >= 7, [r.generated for r in result.records]
