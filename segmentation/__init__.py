"""Dilated FCN on ADE20K-layout datasets with the suite's backbones: the loader (``segmentation.ade20k``),
mmseg's ADE20K pipeline on torchvision.transforms.v2 (``segmentation.transforms``), whole/slide/TTA
inference (``segmentation.inference``), mmseg-style mIoU (``segmentation.metrics``), the FCN
(``segmentation.model``), the mmsegmentation engine (``segmentation.mmseg_engine``, the only module
importing mmseg), ``tricks seg-eval`` (``segmentation.cli``) and the Fashion-MNIST scenes in the ADE20K
layout (``segmentation.scenes``)."""
