"""Faster R-CNN on VOC-layout or COCO-format datasets with the suite's backbones: the loader with your own
classes (``detection.voc``), the devkit's AP and results format (``detection.voc_eval``), COCO instances
JSON (``detection.coco``), COCO metrics by pycocotools (``detection.coco_eval``), VOC <-> COCO conversion
(``detection.convert``), the model
(``detection.model``), the torchvision engine (``detection.train``), the detectron2 engine
(``detection.d2_engine`` and its COCO part ``detection.d2_coco``, the only modules importing detectron2),
``tricks voc-eval`` / ``tricks coco-eval`` (``detection.cli``)
and the Fashion-MNIST scenes in the VOCdevkit layout (``detection.scenes``)."""
