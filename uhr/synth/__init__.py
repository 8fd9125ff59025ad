"""Synthetic UHR archives with exact ground truth: textured land cover, small objects, questions.

`write_scene` writes one georeferenced COG and returns its `SceneTruth`; `write_archive` writes
scenes, a questions table (XLRS-style multiple choice and open answers) and, for training, LLaVA
conversations. `python -m uhr.synth` is the command line.
"""

from __future__ import annotations

from uhr.synth.archive import ArchiveIndex, cached_archive, conversation, scene_seed, write_archive
from uhr.synth.landcover import LandCover, LandCoverLayout
from uhr.synth.objects import COLOURS, PALETTE, ObjectClass, SceneObject
from uhr.synth.questions import Category, Form, Question, generate_questions, question_prompt
from uhr.synth.scene import Compression, SceneTruth, plan_scene, render_window, write_scene

__all__ = [
    "ArchiveIndex",
    "COLOURS",
    "Category",
    "Compression",
    "Form",
    "LandCover",
    "LandCoverLayout",
    "ObjectClass",
    "PALETTE",
    "Question",
    "SceneObject",
    "SceneTruth",
    "cached_archive",
    "conversation",
    "generate_questions",
    "plan_scene",
    "question_prompt",
    "render_window",
    "scene_seed",
    "write_archive",
    "write_scene",
]
