"""MobileR2L-style neural light field student: rays -> point encoding -> 1x1-conv network."""

from budget3d.nelf.distill import DistillConfig, DistillInterrupted, distill
from budget3d.nelf.frame import Frame
from budget3d.nelf.rays import camera_rays, embed, encode, rays_from_c2w, scene_bounds
from budget3d.nelf.students import build, count_params, load_student
from budget3d.nelf.students.r2l import NeLF, convert_to_pixelshuffle, describe

__all__ = ["DistillConfig", "DistillInterrupted", "Frame", "NeLF", "build", "camera_rays", "convert_to_pixelshuffle",
           "count_params", "describe", "distill", "embed", "encode", "load_student", "rays_from_c2w", "scene_bounds"]
