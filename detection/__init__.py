"""Faster R-CNN on PASCAL VOC with the suite's backbones. In: the VOC loader (``detection.voc``) and the
devkit's AP (``detection.voc_eval``); the detectron2 and torchvision engines are not built yet."""
