"""RoIAlign over a feature pyramid, with inference spread over the CPU's threads.

torchvision's CPU ``roi_align`` kernel is one loop over the regions on one thread, while every convolution around
it uses all of them: at test time, Faster R-CNN's 1000 proposals of 7 x 7 bins (2 x 2 samples each) take about half
a second of single-threaded work on a 2-core machine, the box head's largest cost. Each region is pooled
independently, so cutting the regions into one chunk per thread and pooling the chunks in Python threads (the op
releases the GIL) gives bit-identical results in about half the time. Training keeps the single call: autograd and
the backward kernel stay exactly torchvision's.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.ops import MultiScaleRoIAlign

MIN_REGIONS_PER_THREAD = 32        # below this the threads' overhead outweighs the work they share


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="detseg-roialign")


def _split(count: int, threads: int) -> list[slice]:
    chunks = max(1, min(threads, count // MIN_REGIONS_PER_THREAD))
    edges = [round(count * i / chunks) for i in range(chunks + 1)]
    return [slice(start, stop) for start, stop in zip(edges[:-1], edges[1:]) if stop > start]


class ThreadedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's :class:`~torchvision.ops.MultiScaleRoIAlign` (same arguments, same results), pooling at
    inference in ``torch.get_num_threads()`` threads, each on a slice of every image's regions."""

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        threads = torch.get_num_threads()
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        needs_grad = torch.is_grad_enabled() and any(value.requires_grad for value in x.values())
        regions = sum(len(b) for b in boxes)
        if tracing or needs_grad or threads < 2 or regions < 2 * MIN_REGIONS_PER_THREAD or \
                next(iter(x.values())).device.type != "cpu":
            return super().forward(x, boxes, image_shapes)
        # roi_align's CPU kernel reads NCHW and copies any other layout (channels-last maps of a fused model) on
        # every call: copy each level once here, not once per thread.
        x = {name: value.contiguous() for name, value in x.items()}
        if self.scales is None or self.map_levels is None:      # set once, before the threads read them
            super().forward(x, [b[:0] for b in boxes], image_shapes)
        # One task per (image, slice of its regions), in the order the single call would stack them.
        tasks = [({name: value[index:index + 1] for name, value in x.items()}, image_boxes[part],
                  image_shapes[index])
                 for index, image_boxes in enumerate(boxes) for part in _split(len(image_boxes), threads)]
        pooled = list(_pool(threads).map(lambda task: super(ThreadedMultiScaleRoIAlign, self).forward(
            task[0], [task[1]], [task[2]]), tasks))
        return torch.cat(pooled)                  # at least 2 * MIN_REGIONS_PER_THREAD regions: never empty
