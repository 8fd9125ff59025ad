"""Synthetic UHR archives with exact ground truth: textured land cover, small objects, questions.

`write_scene` writes one georeferenced COG and returns its `SceneTruth`; `write_archive` writes
scenes, a questions table (XLRS-style multiple choice and open answers) and, for training, LLaVA
conversations. `python -m uhr.synth` is the command line.
"""

from __future__ import annotations

from uhr.synth.archive import ArchiveIndex, conversation, scene_seed, write_archive
from uhr.synth.landcover import LandCover, LandCoverLayout
from uhr.synth.objects import COLOURS, PALETTE, ObjectClass, SceneObject
from uhr.synth.questions import Category, Form, Question, generate_questions, question_prompt
from uhr.synth.scene import Compression, SceneTruth, plan_scene, render_window, write_scene

__all__ = [
    "COLOURS",
    "PALETTE",
    "ArchiveIndex",
    "Category",
    "Compression",
    "Form",
    "LandCover",
    "LandCoverLayout",
    "ObjectClass",
    "Question",
    "SceneObject",
    "SceneTruth",
    "conversation",
    "generate_questions",
    "plan_scene",
    "question_prompt",
    "render_window",
    "scene_seed",
    "write_archive",
    "write_scene",
]
