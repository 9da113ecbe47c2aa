"""The shapes visual-QA benchmark: procedural scenes, six task types, JSONL + PNG splits."""

from calib_data.shapes.scene import (  # noqa: F401
    COLORS,
    DIGITS,
    IMAGE_SIZE,
    SHAPES,
    TASKS,
    caption,
    make_question,
    make_sample,
    make_scene,
    render,
    vocabulary,
)

# Seed bases of the shipped splits; training draws seeds below TRAIN_SEED_LIMIT, so no scene
# of a shipped split is ever trained on.
TRAIN_SEED_LIMIT = 10**9
SPLITS = {"test": (10**9, 3000), "calib": (2 * 10**9, 128)}
