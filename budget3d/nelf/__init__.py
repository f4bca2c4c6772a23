"""MobileR2L-style neural light field student: rays -> point encoding -> 1x1-conv network."""

from budget3d.nelf.distill import DistillConfig, DistillInterrupted, distill, load_student
from budget3d.nelf.net import NeLF, build, convert_to_pixelshuffle, count_params, describe, macs_per_frame
from budget3d.nelf.rays import camera_rays, encode, rays_from_c2w, scene_bounds

__all__ = ["DistillConfig", "DistillInterrupted", "distill", "load_student", "NeLF", "build", "convert_to_pixelshuffle", "count_params", "describe", "macs_per_frame",
           "camera_rays", "encode", "rays_from_c2w", "scene_bounds"]
