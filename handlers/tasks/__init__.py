"""Task handlers: each a few hooks (`load_assets`, `postprocess`) over `handlers.base.VisionHandler`.

    detector.py   ObjectDetector      --task object-detection
    segmenter.py  SemanticSegmenter   --task semantic-segmentation
    embedder.py   ImageEmbedder       --task image-embedding

Image classification lives in `handlers.image_classifier` (its path predates this package).
"""
