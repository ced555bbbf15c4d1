"""Filling the cache with a process pool: slices (and DICOM files) in parallel.

This process reads, normalises and writes; ``processes`` workers compute super-pixels by
blocks of slices, for up to two cases in flight. Parallel by slice, so one large volume (a
CT) scales too, not just many small ones. DICOM series are also decoded by the workers, in
blocks of files (decoding is serial inside ITK).

Workers run numba code or ITK's single-threaded DICOM decoding only, never torch or OpenMP:
forking them from a process that has used those is safe and costs no interpreter start-up.
They exit when this process dies (:func:`die_with_parent`): a parent killed for memory
would otherwise leave them running, holding hundreds of MB each.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from lrc_lightning.data.cases import Case
from lrc_lightning.data.io import (
    assemble_dicom_blocks,
    checked_volume,
    dicom_blocks,
    dicom_series_files,
    read_dicom_block,
    read_volume,
)
from lrc_lightning.data.preprocess import (
    PreprocessConfig,
    ReadCase,
    assemble_entry,
    read_case,
    superpixels_of_slices,
    supervoxels_of_volume,
)
from lrc_lightning.runtime.processes import die_with_parent

__all__ = ["die_with_parent", "precompute_in_pool"]



def precompute_in_pool(
    todo: list[Case],
    config: PreprocessConfig,
    processes: int,
    write: Callable[[Case, dict[str, Any]], Any],
    progress: Callable[[], None],
) -> None:
    """Build the entries of ``todo`` with ``processes`` workers; ``write`` stores each one
    (in this process), ``progress`` is called after each."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    superpixels_of_slices(np.zeros((1, 8, 8), np.float32), config)  # compiled once, inherited
    in_flight: deque[tuple[ReadCase, list[Future]]] = deque()

    def finish_oldest() -> None:
        read, futures = in_flight.popleft()
        superpixels = np.concatenate([f.result() for f in futures])
        write(read.case, assemble_entry(read, superpixels, config))
        progress()

    with ProcessPoolExecutor(
        max_workers=processes,
        mp_context=context,
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    ) as pool:

        def read_image(path: Path, series: str | None) -> sitk.Image:
            if not path.is_dir():
                return read_volume(path, series)
            blocks = dicom_blocks(dicom_series_files(path, series), 2 * processes)
            if len(blocks) == 1:
                return read_volume(path, series)
            futures = [pool.submit(read_dicom_block, str(path), b) for b in blocks]
            image = assemble_dicom_blocks([f.result() for f in futures])
            return read_volume(path, series) if image is None else checked_volume(image, path)

        for case in todo:
            read = read_case(case, config, read_image)
            if config.supervoxels:  # one graph per volume: parallel across cases only
                future = pool.submit(supervoxels_of_volume, read.image, read.spacing, config,
                                     str(case.image))  # fmt: skip
                in_flight.append((read, [future]))
                if len(in_flight) > processes:
                    finish_oldest()
                continue
            block = max(1, -(-len(read.image) // (4 * processes)))  # ~4 blocks per worker
            futures = [
                pool.submit(superpixels_of_slices, read.image[i : i + block], config)
                for i in range(0, len(read.image), block)
            ]
            in_flight.append((read, futures))
            if len(in_flight) > 1:
                finish_oldest()
        while in_flight:
            finish_oldest()
