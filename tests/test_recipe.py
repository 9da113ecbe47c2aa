"""Recipe: schema rules (one test each, message asserted), presets, YAML round-trip, content hash."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from quota_export import UserError
from quota_export.recipe import (
    FP,
    SCHEMES,
    W4A4KV4,
    ActQuant,
    KVQuant,
    Recipe,
    WeightQuant,
    load_recipe,
    save_recipe,
)

torch.set_num_threads(1)

N_LAYERS = 4
N_VISUAL = 16


def base() -> dict:
    return {
        "name": "tiny-w4a4kv4",
        "model": "models/tiny",
        "quant": {"scheme": "w4a4kv4"},
        "pruning": {
            "budget": 0.75,
            "n_visual": N_VISUAL,
            "stages": [
                {"layer": 1, "keep": 12},
                {"layer": 2, "keep": 8, "weights": {"magnitude": 0.25, "attention": 1.0, "risk": 0.5}},
            ],
        },
    }


def write(tmp_path, data, name="r.yaml") -> str:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(p)


def load_error(tmp_path, data) -> str:
    path = write(tmp_path, data)
    with pytest.raises(UserError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    return msg[len(path) + 2 :]


def mutate(**paths):
    """base() with dotted paths set (a value of `DEL` removes the key)."""
    d = base()
    for dotted, value in paths.items():
        keys = dotted.split("__")
        node = d
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        last = keys[-1]
        if value is DEL:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return d


DEL = object()


def tiny_module_names(num_layers: int = 2) -> list[str]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    tc = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=99))
    return [n for n, _ in model.named_modules()]


@pytest.fixture(scope="module")
def names() -> list[str]:
    return tiny_module_names(N_LAYERS)


# ---------------------------------------------------------------- valid recipe, derived views


def test_base_recipe_loads(tmp_path):
    r = load_recipe(write(tmp_path, base()))
    assert r.kept_per_layer(N_LAYERS) == [16, 12, 8, 8]
    assert r.mean_keep_fraction(N_LAYERS) == pytest.approx((16 + 12 + 8 + 8) / (4 * 16))
    assert r.export.opset == 21 and r.export.targets == ["onnx"] and r.calibration is None
    assert r.model_path() == (Path.cwd() / "models/tiny").resolve()


def test_kept_per_layer_no_stages_and_stage_at_zero():
    d = mutate(pruning__stages=[], pruning__budget=1.0)
    assert Recipe.model_validate(d).kept_per_layer(3) == [16, 16, 16]
    d = mutate(pruning__stages=[{"layer": 0, "keep": 4}], pruning__budget=0.25)
    r = Recipe.model_validate(d)
    assert r.kept_per_layer(3) == [4, 4, 4] and r.mean_keep_fraction(3) == 0.25


def test_check_against_ok(names):
    Recipe.model_validate(base()).check_against(N_LAYERS, N_VISUAL, names)


def test_quantized_modules(names):
    r = Recipe.model_validate(base())
    got = r.resolved_quant().weights.quantized(names)
    assert len(got) == 7 * N_LAYERS
    assert "model.language_model.layers.3.mlp.down_proj" in got
    assert not any("vision_tower" in n or "lm_head" in n for n in got)
    assert Recipe.model_validate(mutate(quant={"scheme": "fp"})).resolved_quant().weights.quantized(names) == []


# ---------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match=r"nope\.yaml: no such recipe file$"):
        load_recipe(path)


def test_bad_yaml(tmp_path):
    msg = load_error(tmp_path, "name: x\nquant: [1, 2\n")
    assert msg.startswith("invalid YAML at line 3, column 1:")


def test_duplicate_key(tmp_path):
    msg = load_error(tmp_path, yaml.safe_dump(base(), sort_keys=False) + "name: again\n")
    assert "duplicate key 'name'" in msg


def test_not_a_mapping(tmp_path):
    assert load_error(tmp_path, "- 1\n- 2\n") == "a recipe must be a YAML mapping, got list"
    assert load_error(tmp_path, "") == "a recipe must be a YAML mapping, got NoneType"


# ---------------------------------------------------------------- schema rules, one each


def test_unknown_key_forbidden(tmp_path):
    assert load_error(tmp_path, mutate(colour="red")) == "colour: Extra inputs are not permitted"
    msg = load_error(tmp_path, mutate(pruning__stages__0__kep=3))
    assert msg == "pruning.stages.0.kep: Extra inputs are not permitted"


def test_missing_required(tmp_path):
    assert load_error(tmp_path, mutate(model=DEL)) == "model: Field required"


def test_strict_types(tmp_path):
    assert load_error(tmp_path, mutate(pruning__n_visual="16")) == "pruning.n_visual: Input should be a valid integer"
    msg = load_error(tmp_path, mutate(quant={"scheme": "w4a4kv4", "activations": {"rotation": True}}))
    assert msg == "quant.activations.rotation: Input should be 'none' or 'hadamard'"


def test_name_is_folder_name(tmp_path):
    msg = load_error(tmp_path, mutate(name="../evil"))
    assert msg == "name: name '../evil' must be a folder name: letters, digits, '.', '_', '-' (not first)"


def test_model_not_empty(tmp_path):
    assert load_error(tmp_path, mutate(model=" ")) == "model: model must name a checkpoint folder"


def test_weight_bits_literal(tmp_path):
    msg = load_error(tmp_path, mutate(quant={"weights": {"bits": 3}, "activations": {}, "kv_cache": {}}))
    assert msg == "quant.weights.bits: Input should be 4, 8 or 16"


def test_group_size_power_of_two(tmp_path):
    q = {"scheme": "w4a4kv4", "weights": {"bits": 4, "group_size": 48}}
    assert load_error(tmp_path, mutate(quant=q)) == "quant.weights.group_size: group_size 48 must be a positive power of 2"


def test_gptq_damp_range(tmp_path):
    q = {"scheme": "w4a4kv4", "weights": {"bits": 4, "algorithm": "gptq", "gptq": {"damp": 1.5}}}
    assert load_error(tmp_path, mutate(quant=q)) == "quant.weights.gptq.damp: damp 1.5 must be in (0, 1)"


def test_invalid_regex(tmp_path):
    q = {"scheme": "w4a4kv4", "weights": {"bits": 4, "ignore": ["lm_head", "vision_(tower"]}}
    msg = load_error(tmp_path, mutate(quant=q))
    assert msg.startswith("quant.weights.ignore.1: invalid regex 'vision_(tower': missing )")


def test_kv_must_be_asymmetric(tmp_path):
    q = {"scheme": "w4a4kv4", "kv_cache": {"bits": 4, "asymmetric": False}}
    msg = load_error(tmp_path, mutate(quant=q))
    assert msg == (
        "quant.kv_cache.asymmetric: asymmetric must be true for bits 4 < 16 (the KV-cache quantizer is asymmetric only)"
    )
    KVQuant(bits=16, asymmetric=False)  # fine: not quantized


def test_kv_group_size_positive(tmp_path):
    q = {"scheme": "w4a4kv4", "kv_cache": {"group_size": 0}}
    msg = load_error(tmp_path, mutate(quant=q))
    assert msg == "quant.kv_cache.group_size: group_size 0 must be positive (or null for head_dim)"


def test_unknown_scheme(tmp_path):
    msg = load_error(tmp_path, mutate(quant={"scheme": "w3a3"}))
    assert msg == "quant.scheme: unknown scheme 'w3a3' (known: w4a4kv4, w4a4kv4-rot, w4a4kv8, w4a16, w8a8, fp)"


def test_no_scheme_needs_all_sections(tmp_path):
    msg = load_error(tmp_path, mutate(quant={"weights": {"bits": 4}, "kv_cache": {}}))
    assert msg == "quant: no scheme given, so weights, activations and kv_cache must all be spelled out (missing: activations)"


def test_budget_range(tmp_path):
    assert load_error(tmp_path, mutate(pruning__budget=0.0)) == "pruning.budget: Input should be greater than 0"
    assert load_error(tmp_path, mutate(pruning__budget=1.5)) == "pruning.budget: Input should be less than or equal to 1"


def test_n_visual_positive(tmp_path):
    msg = load_error(tmp_path, mutate(pruning__n_visual=0, pruning__stages=[], pruning__budget=1.0))
    assert msg == "pruning.n_visual: Input should be greater than 0"


def test_stage_layer_and_keep_bounds(tmp_path):
    assert load_error(tmp_path, mutate(pruning__stages__0__layer=-1)) == (
        "pruning.stages.0.layer: Input should be greater than or equal to 0"
    )
    assert load_error(tmp_path, mutate(pruning__stages__1__keep=0)) == (
        "pruning.stages.1.keep: Input should be greater than or equal to 1"
    )


def test_keep_at_most_n_visual(tmp_path):
    msg = load_error(tmp_path, mutate(pruning__stages__0__keep=17))
    assert msg == "pruning.stages.0.keep: keep 17 > n_visual 16"


def test_layers_strictly_ascending(tmp_path):
    msg = load_error(tmp_path, mutate(pruning__stages__1__layer=1))
    assert msg == "pruning.stages.1.layer: layer 1 <= previous stage layer 1 (must be strictly ascending)"


def test_keep_non_increasing(tmp_path):
    msg = load_error(tmp_path, mutate(pruning__stages__1__keep=13))
    assert msg == "pruning.stages.1.keep: keep 13 > previous stage keep 12 (must be non-increasing)"


def test_no_stages_needs_full_budget(tmp_path):
    msg = load_error(tmp_path, mutate(pruning__stages=[]))
    assert msg == "pruning.budget: no stages means no pruning (mean kept fraction 1), above budget 0.75"


def test_last_stage_above_budget(tmp_path):
    msg = load_error(tmp_path, mutate(pruning__budget=0.25))
    assert msg == (
        "pruning.budget: last stage keeps 8/16 visual tokens, so the mean kept fraction exceeds budget 0.25 "
        "for any layer count"
    )


def test_score_weights_and_sigma(tmp_path):
    msg = load_error(tmp_path, mutate(pruning__stages__0__weights={"risk": -1.0}))
    assert msg == "pruning.stages.0.weights.risk: Input should be greater than or equal to 0"
    msg = load_error(tmp_path, mutate(pruning__stages__0__sigma={"attention": 0.0}))
    assert msg == "pruning.stages.0.sigma.attention: Input should be greater than 0"
    msg = load_error(tmp_path, "\n".join([yaml.safe_dump(mutate(pruning__stages__0__sigma={"magnitude": 1.0})), ""])
                     .replace("magnitude: 1.0", "magnitude: .nan"))
    assert msg == "pruning.stages.0.sigma.magnitude: Input should be a finite number"


def test_calibration_fields(tmp_path):
    cal = {"data": "calib_data/shapes", "samples": 0, "seed": 0, "method": "quota", "divergence": None, "versions": {}}
    assert load_error(tmp_path, mutate(calibration=cal)) == (
        "calibration.samples: Input should be greater than or equal to 1"
    )
    del cal["divergence"]
    cal["samples"] = 8
    assert load_error(tmp_path, mutate(calibration=cal)) == "calibration.divergence: Field required"


def test_export_rules(tmp_path):
    assert load_error(tmp_path, mutate(export={"opset": 20})) == (
        "export.opset: Input should be greater than or equal to 21"
    )
    assert load_error(tmp_path, mutate(export={"targets": []})) == (
        "export.targets: at least one export target is needed"
    )
    assert load_error(tmp_path, mutate(export={"targets": ["onnx", "onnx"]})) == (
        "export.targets: duplicate export targets ['onnx', 'onnx']"
    )
    assert load_error(tmp_path, mutate(export={"targets": ["tflite"]})) == (
        "export.targets.0: Input should be 'onnx' or 'tensorrt'"
    )
    assert load_error(tmp_path, mutate(export={"max_seq": 0})) == "export.max_seq: Input should be greater than 0"


def test_numerics_fields(tmp_path):
    assert load_error(tmp_path, mutate(export={"reductions": "fp16"})) == (
        "export.reductions: Input should be 'fp64' or 'fp32'"
    )
    q = {"scheme": "w4a4kv4", "weights": {"bits": 4, "accumulation": "int"}}
    assert load_error(tmp_path, mutate(quant=q)) == "quant.weights.accumulation: Input should be 'exact' or 'float'"
    w = WeightQuant(bits=4)
    assert w.accumulation == "exact" and w.scale_bits_for(512, 4) == 9 and w.scale_bits_for(512, 16) is None
    assert WeightQuant(bits=4, accumulation="float").scale_bits_for(512, 4) is None
    with pytest.raises(ValueError, match="too wide for exact accumulation"):
        WeightQuant(bits=8).scale_bits_for(8192, 8)


def test_several_errors_on_one_line(tmp_path):
    msg = load_error(tmp_path, mutate(colour="red", pruning__budget=2.0))
    assert msg == "pruning.budget: Input should be less than or equal to 1; colour: Extra inputs are not permitted"


# ---------------------------------------------------------------- checks against the model


def test_check_layer_out_of_range(names):
    r = Recipe.model_validate(mutate(pruning__stages__1__layer=4))
    with pytest.raises(UserError) as e:
        r.check_against(N_LAYERS, N_VISUAL, names)
    assert str(e.value) == "pruning.stages.1.layer: layer 4 >= number of decoder layers 4"


def test_check_n_visual(names):
    r = Recipe.model_validate(base())
    with pytest.raises(UserError) as e:
        r.check_against(N_LAYERS, 576, names)
    assert str(e.value) == "pruning.n_visual: recipe was made for 16 visual tokens per image, the model produces 576"


def test_check_budget(names):
    r = Recipe.model_validate(mutate(pruning__budget=0.6))  # mean is 44/64 = 0.6875
    with pytest.raises(UserError) as e:
        r.check_against(N_LAYERS, N_VISUAL, names)
    assert str(e.value) == "pruning.budget: mean kept fraction 0.6875 over 4 decoder layers exceeds budget 0.6"
    Recipe.model_validate(mutate(pruning__budget=0.6875)).check_against(N_LAYERS, N_VISUAL, names)  # equal is fine


def test_check_target_matches_nothing(names):
    q = {"scheme": "w4a4kv4", "weights": {"bits": 4, "targets": [r"language_model\.layers", r"^model\.visual\."]}}
    r = Recipe.model_validate(mutate(quant=q))
    with pytest.raises(UserError) as e:
        r.check_against(N_LAYERS, N_VISUAL, names)
    assert str(e.value) == "quant.weights.targets.1: pattern '^model\\\\.visual\\\\.' matches no module of the model"


def test_check_ignore_matches_nothing(names):
    q = {"scheme": "w4a4kv4", "weights": {"bits": 4, "ignore": ["lm_head", "visual.merger"]}}
    r = Recipe.model_validate(mutate(quant=q))
    with pytest.raises(UserError) as e:
        r.check_against(N_LAYERS, N_VISUAL, names)
    assert str(e.value) == "quant.weights.ignore.1: pattern 'visual.merger' matches no module of the model"


# ---------------------------------------------------------------- presets


def test_presets_are_valid_and_distinct():
    assert list(SCHEMES) == ["w4a4kv4", "w4a4kv4-rot", "w4a4kv8", "w4a16", "w8a8", "fp"]
    dumps = {yaml.safe_dump(s.model_dump()) for s in SCHEMES.values()}
    assert len(dumps) == len(SCHEMES)
    assert SCHEMES["w4a4kv8"].kv_cache.bits == 8 and SCHEMES["w4a16"].activations.bits == 16
    assert SCHEMES["w8a8"].weights.bits == 8 and FP.weights.bits == FP.activations.bits == FP.kv_cache.bits == 16
    rot = SCHEMES["w4a4kv4-rot"]
    assert rot.weights.granularity == "channel" and rot.activations.rotation == "hadamard"


def test_scheme_alone_resolves_to_preset():
    r = Recipe.model_validate(base())
    assert r.resolved_quant() == W4A4KV4


def test_spelled_out_section_overrides_whole_section():
    q = {"scheme": "w4a4kv4", "weights": {"bits": 8, "granularity": "channel"}}
    rq = Recipe.model_validate(mutate(quant=q)).resolved_quant()
    assert rq.weights == WeightQuant(bits=8, granularity="channel")  # not merged field by field
    assert rq.activations == W4A4KV4.activations and rq.kv_cache == W4A4KV4.kv_cache


def test_spelled_out_without_scheme():
    q = {"weights": {"bits": 4, "group_size": 64}, "activations": {"bits": 8}, "kv_cache": {"bits": 8}}
    rq = Recipe.model_validate(mutate(quant=q)).resolved_quant()
    assert rq.weights.group_size == 64 and rq.activations == ActQuant(bits=8) and rq.kv_cache.bits == 8


def test_resolved_quant_is_a_copy():
    r = Recipe.model_validate(base())
    rq = r.resolved_quant()
    rq.weights.bits = 8
    rq.weights.ignore.append("x")
    assert W4A4KV4.weights.bits == 4 and "x" not in W4A4KV4.weights.ignore
    assert r.resolved_quant() == W4A4KV4


# ---------------------------------------------------------------- YAML round-trip, hash


def full() -> Recipe:
    d = base()
    d["quant"] = {"scheme": "w4a4kv8", "weights": {"bits": 4, "algorithm": "gptq", "gptq": {"damp": 0.1 + 0.2}}}
    d["pruning"]["stages"][1]["sigma"] = {"magnitude": 1e-9, "attention": 0.1234567890123456789, "risk": 3e16}
    d["calibration"] = {
        "data": "calib_data/shapes",
        "samples": 32,
        "seed": 7,
        "method": "quota",
        "divergence": 0.0123456789,
        "versions": {"torch": "2.13.0", "transformers": "5.23.0"},
        "notes": "yes: no\n# not a comment",
    }
    d["export"] = {"targets": ["onnx", "tensorrt"], "reductions": "fp32"}
    return Recipe.model_validate(d)


def test_yaml_round_trip(tmp_path):
    r = full()
    p1, p2 = tmp_path / "a.yaml", tmp_path / "sub" / "b.yaml"
    save_recipe(r, p1)
    save_recipe(load_recipe(p1), p2)
    assert load_recipe(p1) == r
    assert p1.read_bytes() == p2.read_bytes() == r.to_yaml().encode()
    back = load_recipe(p1)
    assert back.pruning.stages[1].sigma.attention == 0.1234567890123456789  # floats exact
    assert back.quant.weights.gptq.damp == 0.1 + 0.2
    assert sorted(os.listdir(tmp_path)) == ["a.yaml", "sub"]  # no temp file left behind


def test_yaml_key_order_follows_model():
    text = full().to_yaml()
    top = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "-"))]
    assert top == ["name", "model", "quant", "pruning", "calibration", "export"]


def test_round_trip_minimal(tmp_path):
    r = Recipe.model_validate(base())
    assert Recipe.model_validate(yaml.safe_load(r.to_yaml())) == r


def test_content_hash_stable_and_name_free():
    r = full()
    h = r.content_hash()
    assert len(h) == 64 and h == full().content_hash()
    assert Recipe.model_validate(yaml.safe_load(r.to_yaml())).content_hash() == h
    assert r.model_copy(update={"name": "other"}).content_hash() == h


def test_content_hash_sees_content():
    r = Recipe.model_validate(base())
    h = r.content_hash()
    for change in (
        mutate(pruning__budget=0.8),
        mutate(model="models/other"),
        mutate(quant={"scheme": "w4a4kv8"}),
        mutate(export={"opset": 22}),
        mutate(pruning__stages__1__weights={"risk": 0.5000001}),
    ):
        assert Recipe.model_validate(change).content_hash() != h


def test_content_hash_preset_equals_spelled_out():
    spelled = {k: v.model_dump() for k, v in W4A4KV4}
    a = Recipe.model_validate(base())
    b = Recipe.model_validate(mutate(quant=copy.deepcopy(spelled)))
    assert a.content_hash() == b.content_hash()


def test_refused_knobs_are_schema_errors(tmp_path):
    """Knobs the code never read are gone from the schema: a recipe naming them is one error line."""
    assert load_error(tmp_path, mutate(export={"gather": "plugin"})).startswith("export.gather")
    msg = load_error(tmp_path, mutate(quant={"scheme": "w4a4kv4", "activations": {"bits": 4, "granularity": "tensor"}}))
    assert msg.startswith("quant.activations.granularity")
