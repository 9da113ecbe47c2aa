"""The training script's data: the training-only tasks are well formed and, switched off, leave
the batches of earlier steps exactly as they were (a resumed run sees the same data)."""

import random

import pytest

from calib_data.shapes import make_scene
from calib_data.shapes.model import build_tokenizer
from calib_data.shapes.train import locate, make_example, spatial_drill


def _drawn(task, n: int):
    """(scene, question, answer) of the scenes 0..n-1 that `task(scene, rng)` has a query for."""
    for seed in range(n):
        scene = make_scene(seed)
        r = task(scene, random.Random(seed))
        if r is not None:
            yield scene, *r


def test_spatial_drill_spells_out_both_places_then_the_relation():
    seen = {"direct": 0, "rationale": 0}
    for scene, q, a in _drawn(spatial_drill, 300):
        if q.startswith("where is the "):
            seen["direct"] += 1
            assert a in ("left", "right", "above", "below")
            continue
        seen["rationale"] += 1
        w = a.split()
        assert w[0::2][:4] == ["row", "col", "row", "col"], a
        r1, c1, r2, c2 = (int(x) for x in w[1:8:2])
        rel = w[8]
        if r1 == r2:
            assert rel == ("left" if c1 < c2 else "right")
        else:
            assert c1 == c2 and rel == ("above" if r1 < r2 else "below")
        name_a, name_b = q[len("describe "):].split(" relative to ")
        objs = {f"{o.color} {o.kind}": o for o in scene.objects}
        assert (objs[name_a].row, objs[name_a].col, objs[name_b].row, objs[name_b].col) == (r1, c1, r2, c2)
    assert seen["direct"] > 20 and seen["rationale"] > 20, seen


def test_locate_answers_the_place_or_no():
    for scene, q, a in _drawn(locate, 100):
        _, color, kind = q.split()
        match = [o for o in scene.objects if o.color == color and o.kind == kind]
        assert a == ("no" if not match else f"row {match[0].row} col {match[0].col}")


def test_training_only_tasks_off_leave_the_data_unchanged():
    vocab = build_tokenizer().get_vocab()
    for seed in range(40):
        a = make_example(seed, vocab)
        b = make_example(seed, vocab, locate_frac=0.0, spatial_frac=0.0)
        assert a[0] == b[0] and a[1] == b[1] and a[4] == b[4] and (a[2] == b[2]).all()
    # switched on, every word is in the vocabulary (make_example would raise KeyError)
    tasks = {make_example(seed, vocab, locate_frac=0.2, spatial_frac=0.25)[4] for seed in range(200)}
    assert {"locate", "spatial", "caption"} <= tasks


def test_prompt_layouts_match_the_saved_chat_templates():
    """prompt_text (what training feeds) equals what each layout's chat template renders (what
    every consumer of the saved folder builds), and "twice" puts the question on both sides."""
    from calib_data.shapes.model import LAYOUTS, build_processor, prompt_text

    tok = build_tokenizer()
    q = "where is the red circle relative to the blue square ?"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    for layout in LAYOUTS:
        text = build_processor(tok, layout).apply_chat_template(msgs, add_generation_prompt=True)
        assert text.split() == prompt_text(q, layout).split(), layout
    before, after = prompt_text(q, "twice").split("<image>")
    assert q in before and q in after
    assert prompt_text(q, "after").split("<image>")[0].split() == ["USER", ":"]


def test_twice_layout_changes_only_the_prompt():
    vocab = build_tokenizer().get_vocab()
    for seed in range(20):
        a = make_example(seed, vocab)
        b = make_example(seed, vocab, layout="twice")
        extra = len(b[0]) - len(a[0])
        assert extra > 0 and b[1] - a[1] == extra  # the question's words, once more, before the image
        assert a[0][a[1]:] == b[0][b[1]:] and a[4] == b[4] and (a[2] == b[2]).all()


def test_slot_layout_puts_the_image_at_one_position():
    """Layout "slot": the image starts at the same token for every question of the shipped splits
    (the exported graphs take it at one fixed position), and the question is on both sides."""
    import json
    from pathlib import Path

    from calib_data.shapes.model import QUESTION_SLOT, build_processor

    root = Path(__file__).resolve().parents[2] / "calib_data" / "shapes"
    tok = build_tokenizer()
    proc = build_processor(tok, "slot")
    image_id = tok.get_vocab()["<image>"]
    starts = set()
    for split in ("test.jsonl", "calib.jsonl"):
        for line in (root / split).read_text().splitlines()[:300]:
            q = json.loads(line)["question"]
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            ids = tok(proc.apply_chat_template(msgs, add_generation_prompt=True))["input_ids"]
            starts.add(ids.index(image_id))
            text = tok.decode(ids)
            assert text.count(q) == 2, text
    assert starts == {3 + QUESTION_SLOT}


def test_spatial_probe_and_role_targets_name_both_places():
    vocab = build_tokenizer().get_vocab()
    seen = 0
    for seed in range(300):
        ids, start, _img, _lab, task, places, roles = make_example(seed, vocab, locate_frac=0.2, spatial_frac=0.25)
        if task != "spatial":
            assert places == [-100] * 4
            if task == "locate":  # the named object's 2x2 patches, or none for an absent pair
                assert set(roles.tolist()) <= {0, 1} and (roles == 1).sum() in (0, 4)
                assert ((roles == 1).sum() == 4) == (vocab_words(vocab, ids[start:])[0] == "row")
            else:
                assert (roles == -100).all()
            continue
        seen += 1
        grid = roles.reshape(12, 12)
        for role, (r, c) in ((1, places[:2]), (2, places[2:])):
            assert (grid == role).sum() == 4 and (grid[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] == role).all()
        assert all(0 <= p < 6 for p in places)
        answer = vocab_words(vocab, ids[start:])
        if answer[0] == "row":  # the drill spells the places out: the probe's targets are those
            assert [int(w) for w in (answer[1], answer[3], answer[5], answer[7])] == places
        else:  # the relation agrees with the two places
            ra, ca, rb, cb = places
            rel = {"left": ra == rb and ca < cb, "right": ra == rb and ca > cb,
                   "above": ca == cb and ra < rb, "below": ca == cb and ra > rb}
            assert rel[answer[0]]
    assert seen > 20


def vocab_words(vocab, ids):
    inv = {i: w for w, i in vocab.items()}
    return [inv[i] for i in ids]


@pytest.mark.slow
def test_export_writes_the_saved_state_as_a_loadable_folder(tmp_path, capsys):
    """Two training steps save a state (the training state is not shipped); --export writes it as a
    loadable HF folder."""
    import json

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from calib_data.shapes.train import main

    state = tmp_path / "state"
    assert main(["--out", str(tmp_path / "m0"), "--state", str(state), "--stop-after", "2", "--batch", "2",
                 "--save-every", "1", "--eval-every", "100000", "--threads", "1"]) == 0
    assert main(["--export", "--state", str(state), "--out", str(tmp_path / "m")]) == 0
    step = json.loads((state / "state.json").read_text())["step"]
    assert json.loads((tmp_path / "m" / "training.json").read_text())["step"] == step
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "m")
    AutoProcessor.from_pretrained(tmp_path / "m")
    assert main(["--export", "--state", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "no saved state to export" in capsys.readouterr().err
    assert not (tmp_path / "none").exists() and not (tmp_path / "x").exists()


def test_lr_phase_one_unchanged_and_phase_two_restarts():
    """Steps before phase 2 get the lr the step-24000 model trained with (cosine over 24000
    steps); phase 2 warms up again to its own peak and decays to a tenth of it."""
    import math

    from calib_data.shapes.train import lr_two_phase

    def old(s, base=1e-3, total=24000, warmup=300):
        if s < warmup:
            return base * (s + 1) / warmup
        t = min(1.0, (s - warmup) / (total - warmup))
        return 0.1 * base + 0.9 * base * 0.5 * (1 + math.cos(math.pi * t))

    for s in (0, 299, 300, 5000, 17000, 23999):
        assert lr_two_phase(s, 1e-3, 24000, 5e-4, 30000) == old(s)
    assert lr_two_phase(24000, 1e-3, 24000, 5e-4, 30000) == 5e-4 / 100
    assert lr_two_phase(24100, 1e-3, 24000, 5e-4, 30000) == 5e-4
    assert math.isclose(lr_two_phase(30000, 1e-3, 24000, 5e-4, 30000), 5e-5)
