"""Task handlers: each a few hooks (`load_assets`, `postprocess`) over `handlers.base.VisionHandler`.

    detector.py   ObjectDetector      --task object-detection
    segmenter.py  SemanticSegmenter   --task semantic-segmentation
    embedder.py   ImageEmbedder       --task image-embedding

Image classification lives in `handlers.image_classifier` (its path predates this package).
"""

# `tsgpu archive --task NAME` -> the handler class an archive of that task runs (module:Class).
# Kept free of imports so that `tsgpu --help` lists the tasks without loading torch.
TASK_HANDLERS = {
    "image-classification": "handlers.image_classifier:ImageClassifier",
    "object-detection": "handlers.tasks.detector:ObjectDetector",
    "semantic-segmentation": "handlers.tasks.segmenter:SemanticSegmenter",
    "image-embedding": "handlers.tasks.embedder:ImageEmbedder",
}
