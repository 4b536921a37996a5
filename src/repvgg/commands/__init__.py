"""The ``repvgg`` sub-commands, one module each: its arguments (``add_arguments``), the files it reads
(``inputs(args)``), whether it writes files (``WRITES``), and ``run(args, outputs)``, which calls the library and
prints. Every output goes through the :class:`repvgg.files.Outputs` that the dispatcher builds from ``inputs`` and
``--overwrite``, so no command can write onto its inputs or replace a file unasked.

This table is all that ``repvgg --help`` imports: no torch until a command runs.
"""

from __future__ import annotations

__all__ = ["COMMANDS"]

# name -> one-line help; the module is repvgg.commands.<name>
COMMANDS = {
    "list": "every architecture with train/deploy parameters and GMACs at 224x224",
    "info": "tell what a checkpoint or exported file holds",
    "convert": "re-parameterize a training-time checkpoint into a deploy checkpoint",
    "demo": "the main job on an embedded default, end to end",
    "train": "train on image folders (one process, or many with torchrun)",
    "eval": "top-1/top-5, loss and speed of a checkpoint on an image folder",
    "plot": "draw a training run's loss, top-1 and lr curves to a PNG",
    "export": "export the deploy model to ONNX, TorchScript or OpenVINO, verified",
    "predict": "top-5 classes of images, with the checkpoint's class names and preprocessing",
    "quantize": "post-training int8 quantization of the deploy model, calibrated on images",
    "qat": "quantization-aware fine-tuning of a trained model, then its int8 artifact",
    "bench": "speed and memory of train/deploy forms on each engine vs ResNets, side by side",
    "cache": "what the user cache folder holds (unpacked archives, decoded images, probes); clear it",
}
