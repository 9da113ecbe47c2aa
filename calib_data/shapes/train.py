"""Train the shipped shapes VLM from scratch, resumably: `python -m calib_data.shapes.train`.

Every setting is a CLI default below and is written into the model folder (`training.json`); the
model card (models/shapes-llava/README.md) says why each training-only task was added and when.

- data: scenes drawn on the fly from seeds below TRAIN_SEED_LIMIT (the shipped splits use seeds
  above it), a deterministic function of the step, so a resumed run sees the same batches;
- 1/4 of each batch captions ("describe image"), 3/4 visual questions of the six task types,
  round-robin; from given steps on, training-only tasks take a share of the questions: `locate`
  (--locate-from), spatial drills (`spatial_drill`, --spatial-from), and the prompt layouts
  "twice" / "slot" (the question also before the image, padded to a fixed slot; --twice-from,
  --slot-from; calib_data/shapes/model.py);
- auxiliary losses whose heads are not saved: a dense loss on the projector outputs (per patch:
  colour, kind, digit, row, col), a spatial probe (`spatial_places`, --probe-from) and a role loss
  on the visual tokens (`role_labels`, --roles-from);
- init: text embeddings at std 1, projector output rescaled to RMS 1; LM loss per sample, then
  per batch; AdamW, lr 1e-3, 300 warm-up steps, cosine to 1e-4 over --phase2-from steps, batch
  32, clip 1.0; phase 2 (--phase2-from .. --total-steps) restarts the cosine at --phase2-lr with
  --phase2-spatial-frac of the questions spatial drills.

Checkpoints (model + optimizer + step) go to --state every --save-every steps; a run restarted
with the same --state resumes. The HF folder (--out) is refreshed at every evaluation, and
`--export` writes it from the saved state alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from calib_data.shapes import TASKS, TRAIN_SEED_LIMIT, caption, make_question, make_scene, render
from calib_data.shapes.model import (
    N_VISUAL,
    build_config,
    build_processor,
    build_tokenizer,
    pixels,
    prompt_text,
)
from calib_data.shapes.scene import COLORS, GRID, SHAPES

VAL_SEED = 3 * 10**9
KINDS = ("none",) + SHAPES + ("digit",)
COLOR_LIST = ("none",) + tuple(COLORS)
AUX_SIZES = {"color": len(COLOR_LIST), "kind": len(KINDS), "digit": 11, "row": GRID, "col": GRID}


def patch_labels(scene) -> np.ndarray:
    """5 x 144 int labels: colour, kind, digit (0 = none), row, col of each patch's cell."""
    lab = np.zeros((5, 12, 12), np.int64)
    rows = np.arange(12) // 2
    lab[3] = rows[:, None]
    lab[4] = rows[None, :]
    for o in scene.objects:
        sl = (slice(2 * o.row, 2 * o.row + 2), slice(2 * o.col, 2 * o.col + 2))
        lab[0][sl] = COLOR_LIST.index(o.color)
        lab[1][sl] = KINDS.index(o.kind)
        lab[2][sl] = 0 if o.digit is None else int(o.digit) + 1
    return lab.reshape(5, -1)


def locate(scene, rng: random.Random):
    """A "describe <colour> <kind>" query: the place of the one object with both ("row r col c"),
    or "no" for a colour and a kind that are both in the scene but never together (the absent
    probes of the exist task). None if the scene offers neither. A training-only task: it asks
    for the colour-and-kind binding that exist, spatial and choice questions rest on."""
    shapes = [o for o in scene.objects if o.kind != "digit"]
    pairs = [(o.color, o.kind) for o in shapes]
    if rng.random() < 0.5:
        unique = [o for o in shapes if pairs.count((o.color, o.kind)) == 1]
        if unique:
            o = rng.choice(unique)
            return f"describe {o.color} {o.kind}", f"row {o.row} col {o.col}"
    absent = [(c, k) for c in sorted({p[0] for p in pairs}) for k in sorted({p[1] for p in pairs}) if (c, k) not in pairs]
    if absent:
        c, k = rng.choice(absent)
        return f"describe {c} {k}", "no"
    return None


def spatial_drill(scene, rng: random.Random):
    """A spatial example: the benchmark's question ("where is <a> relative to <b> ?" -> relation)
    or, half the time, the training-only "describe <a> relative to <b>" -> "row r col c row r' col
    c' <relation>", both places spelt out before the relation. None if the scene has no pair."""
    qa = make_question(scene, "spatial", rng)
    if qa is None or rng.random() < 0.5:
        return None if qa is None else (qa["question"], qa["answer"])
    q = qa["question"]
    ra, ca, rb, cb = spatial_places(scene, q)
    return (f"describe {q[len('where is the '):-len(' ?')].replace(' relative to the ', ' relative to ')}",
            f"row {ra} col {ca} row {rb} col {cb} {qa['answer']}")


def spatial_places(scene, question: str) -> list[int]:
    """[row a, col a, row b, col b] of the two objects a spatial question names (the benchmark's
    "where is the <a> relative to the <b> ?" or the drill's "describe <a> relative to <b>")."""
    body = question[len("where is the "):-len(" ?")] if question.startswith("where is the ") \
        else question[len("describe "):]
    a_name, b_name = body.replace(" relative to the ", " relative to ").split(" relative to ")
    named = {f"{o.color} {o.kind}": o for o in scene.objects if o.kind != "digit"}
    a, b = named[a_name], named[b_name]
    return [a.row, a.col, b.row, b.col]


def role_labels(scene, question: str, task: str) -> np.ndarray:
    """144 per-patch labels for the role loss: on a spatial example 1 = the first named object's
    patches, 2 = the second's, 0 = the rest; on a locate example 1 = the named object (none for
    an absent pair), 0 = the rest; -100 (ignored) on every other example."""
    lab = np.full((12, 12), -100 if task not in ("spatial", "locate") else 0, np.int64)
    if task == "spatial":
        ra, ca, rb, cb = spatial_places(scene, question)
        lab[2 * ra : 2 * ra + 2, 2 * ca : 2 * ca + 2] = 1
        lab[2 * rb : 2 * rb + 2, 2 * cb : 2 * cb + 2] = 2
    elif task == "locate":
        name = question[len("describe "):]
        for o in scene.objects:
            if o.kind != "digit" and f"{o.color} {o.kind}" == name:
                lab[2 * o.row : 2 * o.row + 2, 2 * o.col : 2 * o.col + 2] = 1
    return lab.reshape(-1)


def make_example(seed: int, vocab: dict, caption_frac: float = 0.25, locate_frac: float = 0.0,
                 spatial_frac: float = 0.0, layout: str = "after"):
    """(input ids, index of the first answer token, image uint8, labels, task, places, roles):
    places are the spatial probe's targets (`spatial_places`) for a spatial example, else four
    -100; roles the role loss's per-patch labels (`role_labels`)."""
    rng = random.Random(seed)
    for attempt in range(50):
        scene = make_scene(seed * 37 + attempt)
        if rng.random() < caption_frac:
            q, a, task = "describe image", caption(scene), "caption"
        elif locate_frac and rng.random() < locate_frac:  # no draw at 0: earlier steps' data unchanged
            qa = locate(scene, rng)
            if qa is None:
                continue
            (q, a), task = qa, "locate"
        elif spatial_frac and rng.random() < spatial_frac:  # no draw at 0, as above
            qa = spatial_drill(scene, rng)
            if qa is None:
                continue
            (q, a), task = qa, "spatial"
        else:
            task = TASKS[rng.randrange(len(TASKS))]
            qa = make_question(scene, task, rng)
            if qa is None:
                continue
            q, a = qa["question"], qa["answer"]
        break
    prompt = prompt_text(q, layout).split()
    ids = [vocab["<s>"]]
    for w in prompt:
        ids.extend([vocab["<image>"]] * N_VISUAL if w == "<image>" else [vocab[w]])
    start = len(ids)
    ids += [vocab[w] for w in a.split()] + [vocab["</s>"]]
    places = spatial_places(scene, q) if task == "spatial" else [-100] * 4
    return ids, start, render(scene), patch_labels(scene), task, places, role_labels(scene, q, task)


def collate(examples, pad_id: int):
    n = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (x, start, *_rest) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        # label at position t is the token at t+1 (next-token prediction)
        labels[i, start - 1 : len(x) - 1] = torch.tensor(x[start:])
    pix = torch.from_numpy(np.stack([pixels(e[2]) for e in examples]))
    aux = torch.from_numpy(np.stack([e[3] for e in examples]))
    return ids, mask, labels, pix, aux


def probe_targets(examples) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of each example's last prompt token, its 4 spatial probe targets or -100)."""
    last = torch.tensor([e[1] - 1 for e in examples])
    return last, torch.tensor([e[5] for e in examples], dtype=torch.long)


def forward(model, heads, ids, mask, pix, image_token_id):
    feats = model.model.get_image_features(pixel_values=pix)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    if isinstance(feats, (list, tuple)):
        feats = torch.cat(list(feats), 0)
    feats = feats.reshape(ids.shape[0], N_VISUAL, -1)
    emb = model.get_input_embeddings()(ids)
    img_mask = (ids == image_token_id).unsqueeze(-1).expand_as(emb)
    emb = emb.masked_scatter(img_mask, feats.to(emb.dtype))
    out = model(inputs_embeds=emb, attention_mask=mask, output_hidden_states=True)
    return out.logits, heads(feats), out.hidden_states


class AuxHeads(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, sum(AUX_SIZES.values()))

    def forward(self, feats):
        return torch.split(self.proj(feats), list(AUX_SIZES.values()), dim=-1)


class RoleHead(torch.nn.Module):
    """Per visual token: first named object, second, or neither (RMS-normalised input)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, 3)

    def forward(self, h):
        return self.proj(F.rms_norm(h, h.shape[-1:]))


class SpatialProbe(torch.nn.Module):
    """Four linear heads (row a, col a, row b, col b) on one token's hidden state, RMS-normalised
    (the residual stream's scale grows with depth)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, 4 * GRID)

    def forward(self, h):
        h = F.rms_norm(h, h.shape[-1:])
        return self.proj(h).reshape(h.shape[0], 4, GRID)


def lr_at(step: int, base: float, total: int, warmup: int = 300, start: int = 0) -> float:
    """Linear warm-up over `warmup` steps from `start`, then cosine from `base` to base/10 at `total`."""
    step -= start
    total -= start
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 * base + 0.9 * base * 0.5 * (1 + math.cos(math.pi * t))


def lr_two_phase(step: int, base: float, phase2_from: int, phase2_lr: float, total: int) -> float:
    """Phase 1 (steps < phase2_from): 300 warm-up steps, cosine from `base` to base/10 at
    phase2_from. Phase 2: 100 warm-up steps from phase2_from, cosine from `phase2_lr` to
    phase2_lr/10 at `total`."""
    if step < phase2_from:
        return lr_at(step, base, phase2_from)
    return lr_at(step, phase2_lr, total, warmup=100, start=phase2_from)


@torch.no_grad()
def evaluate(model, vocab, n_per_task: int = 50, batch: int = 50, layout: str = "after") -> dict:
    """Greedy first-answer-token accuracy per task on held-out seeds (not the test split)."""
    model.eval()
    inv = {i: w for w, i in vocab.items()}
    res = {}
    for t_i, task in enumerate(TASKS):
        exs = []
        seed = VAL_SEED + t_i * 100000
        while len(exs) < n_per_task:
            rng = random.Random(seed)
            scene = make_scene(seed)
            qa = make_question(scene, task, rng)
            seed += 1
            if qa is None:
                continue
            ids = [vocab["<s>"]]
            for w in prompt_text(qa["question"], layout).split():
                ids.extend([vocab["<image>"]] * N_VISUAL if w == "<image>" else [vocab[w]])
            exs.append((ids, len(ids), render(scene), patch_labels(scene), qa["answer"]))
        correct = 0
        for b in range(0, len(exs), batch):
            chunk = exs[b : b + batch]
            ids, mask, _, pix, _ = collate([(e[0], e[1], e[2], e[3]) for e in chunk], vocab["<pad>"])
            feats = model.model.get_image_features(pixel_values=pix)
            feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
            if isinstance(feats, (list, tuple)):
                feats = torch.cat(list(feats), 0)
            emb = model.get_input_embeddings()(ids)
            m = (ids == vocab["<image>"]).unsqueeze(-1).expand_as(emb)
            emb = emb.masked_scatter(m, feats.reshape(-1, feats.shape[-1]).to(emb.dtype))
            logits = model(inputs_embeds=emb, attention_mask=mask).logits
            last = mask.sum(1) - 1
            pred = logits[torch.arange(len(chunk)), last].argmax(-1).tolist()
            correct += sum(inv[p] == e[4] for p, e in zip(pred, chunk))
        res[task] = correct / len(exs)
    res["overall"] = sum(res[t] for t in TASKS) / len(TASKS)
    model.train()
    return res


def save_hf(model, tokenizer, processor, out: Path, info: dict):
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    # keep the model card (README.md) if present
    if (out / "README.md").exists():
        (tmp / "README.md").write_bytes((out / "README.md").read_bytes())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calib_data.shapes.train")
    ap.add_argument("--out", type=Path, default=Path("models/shapes-llava"))
    ap.add_argument("--state", type=Path, default=Path("models/shapes-llava-train"))
    ap.add_argument("--total-steps", type=int, default=30000)
    ap.add_argument("--phase2-from", type=int, default=24000,
                    help="phase 2 from this step: the lr cosine restarts and spatial drills take a larger share")
    ap.add_argument("--phase2-lr", type=float, default=5e-4)
    ap.add_argument("--phase2-spatial-frac", type=float, default=0.5)
    ap.add_argument("--locate-from", type=int, default=4000,
                    help="from this step on, a share of the questions are 'describe <colour> <kind>' (see locate)")
    ap.add_argument("--locate-frac", type=float, default=0.2, help="that share (of the non-caption examples)")
    ap.add_argument("--spatial-from", type=int, default=9000,
                    help="from this step on, a share of the questions are spatial drills (see spatial_drill)")
    ap.add_argument("--spatial-frac", type=float, default=0.25, help="that share (of the remaining questions)")
    ap.add_argument("--twice-from", type=int, default=13000,
                    help="from this step on, prompts put the question before the image too (layout 'twice')")
    ap.add_argument("--slot-from", type=int, default=16500,
                    help="from this step on, the question before the image is padded to a fixed slot (layout 'slot')")
    ap.add_argument("--probe-from", type=int, default=17000,
                    help="from this step on, spatial examples also train a probe for both places (see SpatialProbe)")
    ap.add_argument("--probe-layer", type=int, default=3, help="the decoder layer whose output the probe reads")
    ap.add_argument("--probe-weight", type=float, default=0.5)
    ap.add_argument("--roles-from", type=int, default=19750,
                    help="from this step on, spatial and locate examples also train the role loss (see RoleHead)")
    ap.add_argument("--roles-layer", type=int, default=2, help="the decoder layer whose visual tokens the role head reads")
    ap.add_argument("--roles-weight", type=float, default=0.5)
    ap.add_argument("--stop-after", type=int, default=None, help="stop at this step (resume later)")
    ap.add_argument("--export", action="store_true",
                    help="write the HF folder (--out) from the saved state, with the layout its last step trained on, and exit")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    from safetensors.torch import load_file, save_file
    from transformers import LlavaForConditionalGeneration

    tok = build_tokenizer()
    procs = {lay: build_processor(tok, lay) for lay in ("after", "twice", "slot")}

    def layout_at(s: int) -> str:
        return "slot" if s >= a.slot_from else "twice" if s >= a.twice_from else "after"

    def lr(s: int) -> float:
        return lr_two_phase(s, a.lr, a.phase2_from, a.phase2_lr, a.total_steps)

    vocab = tok.get_vocab()
    cfg = build_config(tok)
    model = LlavaForConditionalGeneration(cfg)
    heads = AuxHeads(cfg.text_config.hidden_size)
    state_w, state_o, state_j = a.state / "weights.safetensors", a.state / "optim.pt", a.state / "state.json"
    if a.export and not state_j.exists():
        print(f"error: {state_j}: no saved state to export", file=sys.stderr)
        return 2
    a.state.mkdir(parents=True, exist_ok=True)
    # heads that start late (name -> module, its own optimizer at lr --lr, first step): their own
    # optimizers, so states saved before a head existed resume unchanged
    late = {name: (mod, torch.optim.AdamW(mod.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98)), frm)
            for name, mod, frm in (("probe", SpatialProbe(cfg.text_config.hidden_size), a.probe_from),
                                   ("roles", RoleHead(cfg.text_config.hidden_size), a.roles_from))}
    probe, roles = late["probe"][0], late["roles"][0]
    step = 0
    log = []
    opt = torch.optim.AdamW(
        list(model.parameters()) + list(heads.parameters()), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98)
    )
    if state_j.exists():
        sd = load_file(str(state_w))
        model.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
        heads.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("heads.")})
        opt.load_state_dict(torch.load(state_o, weights_only=True))
        for name, (mod, mopt, _) in late.items():
            if any(k.startswith(f"{name}.") for k in sd):
                mod.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(f"{name}.")})
                mopt.load_state_dict(torch.load(a.state / f"{name}_optim.pt", weights_only=True))
        st = json.loads(state_j.read_text())
        step, log = st["step"], st["log"]
        print(f"resumed at step {step}", flush=True)
    else:
        with torch.no_grad():
            emb = model.get_input_embeddings()
            emb.weight.normal_(0.0, 1.0)
            # rescale the projector so image tokens enter the decoder at RMS ~1
            exs = [make_example(10**8 + i, vocab) for i in range(16)]
            _, _, _, pix, _ = collate(exs, vocab["<pad>"])
            f = model.model.get_image_features(pixel_values=pix)
            f = f.pooler_output if hasattr(f, "pooler_output") else f
            f = torch.cat(list(f), 0) if isinstance(f, (list, tuple)) else f
            rms = f.pow(2).mean().sqrt().item()
            model.model.multi_modal_projector.linear_2.weight.mul_(1.0 / rms)
            model.model.multi_modal_projector.linear_2.bias.mul_(1.0 / rms)
            print(f"init: projector output RMS {rms:.3f} -> 1", flush=True)

    def save_state():
        sd = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        sd.update({f"heads.{k}": v.contiguous() for k, v in heads.state_dict().items()})
        for name, (mod, mopt, frm) in late.items():
            if step > frm:
                sd.update({f"{name}.{k}": v.contiguous() for k, v in mod.state_dict().items()})
                f = a.state / f"{name}_optim.pt"
                torch.save(mopt.state_dict(), str(f) + ".tmp")
                os.replace(str(f) + ".tmp", f)
        save_file(sd, str(state_w) + ".tmp")
        torch.save(opt.state_dict(), str(state_o) + ".tmp")
        os.replace(str(state_w) + ".tmp", state_w)
        os.replace(str(state_o) + ".tmp", state_o)
        state_j.write_text(json.dumps({"step": step, "log": log, "args": {k: str(v) for k, v in vars(a).items()}}, indent=0))

    def export():
        info = {"step": step, "log": log,
                "settings": {k: str(v) for k, v in vars(a).items() if k not in ("out", "state", "stop_after", "threads", "export")}}
        save_hf(model, tok, procs[layout_at(step - 1)], a.out, info)  # the layout the last step trained on

    if a.export:
        export()
        print(f"wrote {a.out} (step {step}, layout {layout_at(step - 1)})")
        return 0

    model.train()
    t0, ema = time.time(), None
    stop = min(a.total_steps, a.stop_after or a.total_steps)
    while step < stop:
        loc = a.locate_frac if step >= a.locate_from else 0.0
        spa = a.phase2_spatial_frac if step >= a.phase2_from else a.spatial_frac if step >= a.spatial_from else 0.0
        lay = layout_at(step)
        exs = [make_example((step * a.batch + j) % TRAIN_SEED_LIMIT, vocab, locate_frac=loc, spatial_frac=spa,
                            layout=lay)
               for j in range(a.batch)]
        ids, mask, labels, pix, aux = collate(exs, vocab["<pad>"])
        for g in opt.param_groups:
            g["lr"] = lr(step)  # the late heads keep lr --lr: they start late
        logits, aux_logits, hidden = forward(model, heads, ids, mask, pix, vocab["<image>"])
        # per-sample mean, then batch mean: a one-word answer weighs as much as a 40-token caption
        tok_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        n_sup = (labels != -100).sum(1).clamp_min(1)
        lm = (tok_loss.sum(1) / n_sup).mean()
        aux_loss = sum(F.cross_entropy(al.reshape(-1, al.shape[-1]), aux[:, i].reshape(-1)) for i, al in enumerate(aux_logits))
        loss = lm + a.aux_weight * aux_loss / len(aux_logits)
        probing = step >= a.probe_from
        if probing:
            last, places = probe_targets(exs)
            h = hidden[a.probe_layer][torch.arange(len(exs)), last]
            pl = probe(h)
            probe_loss = F.cross_entropy(pl.reshape(-1, GRID), places.reshape(-1), ignore_index=-100) \
                if (places != -100).any() else pl.sum() * 0.0
            loss = loss + a.probe_weight * probe_loss
        roling = step >= a.roles_from
        if roling:
            vis = ids == vocab["<image>"]
            lab = torch.from_numpy(np.stack([e[6] for e in exs])).reshape(-1)
            rl = roles(hidden[a.roles_layer][vis])
            roles_loss = F.cross_entropy(rl, lab, ignore_index=-100) if (lab != -100).any() else rl.sum() * 0.0
            loss = loss + a.roles_weight * roles_loss
        opt.zero_grad(set_to_none=True)
        for _, mopt, _ in late.values():
            mopt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), 1.0)
        opt.step()
        for _, mopt, frm in late.values():
            if step >= frm:
                mopt.step()
        step += 1
        ema = lm.item() if ema is None else 0.98 * ema + 0.02 * lm.item()
        if step % 50 == 0:
            dt = time.time() - t0
            pr = (f" probe {probe_loss.item():.4f}" if probing else "") + (f" roles {roles_loss.item():.4f}" if roling else "")
            print(f"step {step} lm {ema:.4f} aux {aux_loss.item() / 5:.4f}{pr} lr {lr(step):.2e} {dt / 50:.2f}s/step", flush=True)
            t0 = time.time()
        if step % a.eval_every == 0 or step == stop:
            lay = layout_at(step - 1)  # the layout the last step trained on
            acc = evaluate(model, vocab, layout=lay)
            log.append({"step": step, "lm": round(ema, 4), **{k: round(v, 3) for k, v in acc.items()}, "layout": lay})
            print("eval", json.dumps(log[-1]), flush=True)
            export()
        if step % a.save_every == 0 or step == stop:
            save_state()
    return 0


if __name__ == "__main__":
    sys.exit(main())
