"""The CPU path's internals: what the `cpu` backend (../cpu.py) is built from, and through it every
other backend's CPU fallback.

    decode.py    Pillow decode of one item into a preprocessed crop (draft decoding, EXIF, any mode
                 to RGB, fused resize + crop), torch-free
    upload.py    host -> device: the pinned upload and page-locking of the shared frames
    pool.py      supervision of the decode processes (handler.pipeline.decode_processes)
    frames.py    the shared frames the decode processes write into
    protocol.py  the JSON wire protocol between the worker and a decode process
    child.py     a decode process's entry point

Everything except upload.py is torch-free, and this package imports nothing, because a decode
process imports these modules with Pillow and numpy only.
"""
