"""Image arrays in .npz files (the layout FID tools and ADM's evaluator read: arr_0 uint8 [N, H, W, C]),
written and read a piece at a time, so that 50,000 ImageNet-sized samples (9.8 GB) never have to be
in memory at once. The files are ordinary .npz archives: np.load reads them.

Written files are byte-for-byte reproducible: the same arrays give the same bytes (fixed zip
timestamps, stored uncompressed), whatever pieces they were written in.
"""
import os
import zipfile
from pathlib import Path

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: no wall-clock time in the file


def write_npz(path, members):
    """members: {name: (dtype, shape, pieces)}, pieces an iterable of arrays whose concatenation
    along the first axis is the member (C order). Written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, (dtype, shape, pieces) in members.items():
            dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
            with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH), "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, dict(descr=np.lib.format.dtype_to_descr(dtype),
                                                             fortran_order=False, shape=shape))
                if shape == ():  # a single value (e.g. a JSON string)
                    f.write(np.ascontiguousarray(next(iter(pieces)), dtype=dtype).tobytes())
                    continue
                rows = 0
                for piece in pieces:
                    piece = np.ascontiguousarray(piece, dtype=dtype)
                    if piece.shape[1:] != shape[1:]:
                        raise ValueError(f"{name}: a piece of shape {piece.shape} does not fit {shape}")
                    f.write(piece.tobytes())
                    rows += len(piece)
                if rows != shape[0]:
                    raise ValueError(f"{name}: {rows} rows written, {shape[0]} announced")
    os.replace(tmp, path)


class NpzArray:
    """One member of an .npz, read in batches of rows from the archive (stored or compressed)
    without loading the rest: .shape, .dtype, len(), .batches(n), .read(start, stop)."""

    def __init__(self, path, name="arr_0"):
        self.path, self.name = Path(path), name
        with zipfile.ZipFile(self.path) as zf:
            if f"{name}.npy" not in zf.namelist():
                raise KeyError(name)
            with zf.open(f"{name}.npy") as f:
                self.shape, self.dtype = self._header(f)

    @staticmethod
    def _header(f):
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = read(f)
        if fortran or dtype.hasobject:
            raise ValueError("a Fortran-ordered or object array")
        return shape, dtype

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size, start=0, stop=None):
        """Yields arrays of up to batch_size rows, rows start..stop, in order."""
        stop = len(self) if stop is None else min(stop, len(self))
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.name}.npy") as f:
            self._header(f)
            if start:
                f.seek(f.tell() + start * row_bytes)
            for i in range(start, stop, batch_size):
                n = min(batch_size, stop - i)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise ValueError(f"{self.path} is truncated: {self.name} ends before row {i + n}")
                yield np.frombuffer(data, dtype=self.dtype).reshape(n, *self.shape[1:])

    def read(self, start=0, stop=None):
        """Rows start..stop as one array (a 0-d member: its value)."""
        if self.shape == ():
            with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.name}.npy") as f:
                self._header(f)
                return np.frombuffer(f.read(self.dtype.itemsize), dtype=self.dtype).reshape(())
        if len(self) == 0 or start >= min(len(self), stop or len(self)):
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return np.concatenate(list(self.batches(1 << 30, start, stop)))


def npz_members(path):
    """The member names of an .npz (without '.npy')."""
    with zipfile.ZipFile(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
