"""Faster R-CNN on PASCAL VOC with the suite's backbones (detectron2 and torchvision engines). Not built yet."""
