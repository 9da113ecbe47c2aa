"""Every registered architecture family has a tiny-model pipeline test (reference vs HF, build parity)."""

from __future__ import annotations

from conftest import ROOT

from quota_export import models

# family -> the test module that builds a tiny random checkpoint of it and checks the whole pipeline
PIPELINE_TESTS = {
    "LlavaForConditionalGeneration": "test_build.py",
    "LlavaNextForConditionalGeneration": "models/test_llava_next.py",
    "Qwen2VLForConditionalGeneration": "models/test_qwen2_vl.py",
    "Qwen2_5_VLForConditionalGeneration": "models/test_qwen2_5_vl.py",
}


def test_every_family_has_a_pipeline_test():
    missing = sorted(set(models.REGISTRY) - set(PIPELINE_TESTS))
    assert not missing, f"registered families without a pipeline test: {missing} (add one and list it here)"
    for arch in models.REGISTRY:
        assert (ROOT / "tests" / PIPELINE_TESTS[arch]).is_file(), PIPELINE_TESTS[arch]
