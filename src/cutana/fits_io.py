"""Lazy, windowed access to FITS images (SPEC §4).

Survey mosaics can be many GB, so an image is never read whole:

* uncompressed images are memory-mapped and only the requested window is copied;
* tile-compressed images (``CompImageHDU``) are read through ``hdu.section``, which decompresses
  only the tiles that the window touches, in tile-aligned blocks kept in a small LRU cache
  (:data:`COMPRESSED_CACHE_BYTES` per image) so neighbouring stamps do not decompress the same
  tiles again.

Files are opened with ``do_not_scale_image_data=True`` and ``BSCALE``/``BZERO``/``BLANK`` are
applied here to the window only: astropy refuses to scale a memory-mapped image lazily, and
letting it scale would materialise the whole image as floating point.

astropy is imported only when a file is opened through it (:func:`open_image`). A cutout job
whose batch carries each image's layout (made by ``split_catalogue`` with :func:`image_layout`)
maps the pixels with :func:`map_image` instead and never imports astropy (~0.5 s of a job's
start-up); a layout that no longer matches its file (size, mtime, ctime or inode) is not used.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .exceptions import FitsValidationError

if TYPE_CHECKING:
    from astropy.io import fits
    from astropy.wcs import WCS

    from .wcs_utils import CutoutHeaderTemplate

# FITS files are written in blocks of 2880 bytes; the last block of a data unit is padded.
_FITS_BLOCK = 2880

#: Pixels per cached block of a tile-compressed image (tile-aligned, about 1 M pixels).
COMPRESSED_BLOCK_PIXELS = 1 << 20
#: Bytes of decompressed blocks kept per compressed image (least recently used are dropped).
COMPRESSED_CACHE_BYTES = 64 * 1024 * 1024
#: Pages (4 KiB) of a memory-mapped image a handle may keep mapped before unmapping them (64 MB).
MAPPED_PAGES_BUDGET = 16384


class _BlockCache:
    """Decompressed, tile-aligned blocks of one compressed image, least recently used first out.

    Neighbouring stamps share compression tiles; astropy's ``section`` decompresses every tile a
    window touches on every call, so without this cache a batch decompresses the same tiles
    many times over. Blocks are whole tiles, so each tile is decompressed once while cached, and
    the byte budget bounds memory whatever the image size.
    """

    def __init__(self, hdu, shape: tuple[int, ...], leading: tuple[int, ...]) -> None:
        self._hdu = hdu
        self._leading = leading
        ny, nx = shape[-2], shape[-1]
        self._shape = (ny, nx)
        try:
            tile_y, tile_x = (int(n) for n in tuple(hdu.tile_shape)[-2:])
        except Exception:  # unknown tiling: fall back to row tiles (the FITS default)
            tile_y, tile_x = 1, nx
        tile_y, tile_x = max(1, min(tile_y, ny)), max(1, min(tile_x, nx))
        side = int(np.sqrt(COMPRESSED_BLOCK_PIXELS))
        block_x = min(nx, max(tile_x, side // tile_x * tile_x))
        block_y = max(tile_y, COMPRESSED_BLOCK_PIXELS // block_x // tile_y * tile_y)
        self._block = (min(ny, block_y), block_x)
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0

    def _get_block(self, by: int, bx: int) -> np.ndarray:
        key = (by, bx)
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
            return block
        (ny, nx), (hy, hx) = self._shape, self._block
        y0, x0 = by * hy, bx * hx
        window = self._leading + (slice(y0, min(ny, y0 + hy)), slice(x0, min(nx, x0 + hx)))
        block = np.asarray(self._hdu.section[window])
        self._blocks[key] = block
        self._bytes += block.nbytes
        while self._bytes > COMPRESSED_CACHE_BYTES and len(self._blocks) > 1:
            _, dropped = self._blocks.popitem(last=False)
            self._bytes -= dropped.nbytes
        return block

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Raw (unscaled) pixels of ``[y0:y1, x0:x1]``, assembled from cached blocks."""
        hy, hx = self._block
        if y1 <= y0 or x1 <= x0:
            return np.asarray(self._hdu.section[self._leading + (slice(y0, y1), slice(x0, x1))])
        out = None
        for by in range(y0 // hy, (y1 - 1) // hy + 1):
            for bx in range(x0 // hx, (x1 - 1) // hx + 1):
                block = self._get_block(by, bx)
                if out is None:
                    out = np.empty((y1 - y0, x1 - x0), dtype=block.dtype)
                oy0, ox0 = max(y0, by * hy), max(x0, bx * hx)
                oy1, ox1 = min(y1, (by + 1) * hy), min(x1, (bx + 1) * hx)
                out[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] = block[
                    oy0 - by * hy : oy1 - by * hy, ox0 - bx * hx : ox1 - bx * hx
                ]
        return out


def _describe_hdus(hdul: fits.HDUList) -> str:
    """List the HDUs of a file as ``index (NAME, shape)`` for error messages."""
    parts = []
    for index, hdu in enumerate(hdul):
        shape = getattr(hdu, "shape", None) if hdu.is_image else None
        kind = "image " + "x".join(str(n) for n in shape) if shape else "no image data"
        parts.append(f"{index} ({hdu.name or 'unnamed'}: {kind})")
    return ", ".join(parts)


def _select_hdu(hdul: fits.HDUList, extension: str | int, path: Path):
    """Return the HDU named or numbered ``extension`` or raise a FitsValidationError."""
    key: str | int = extension
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        key = int(key.strip())
    try:
        if isinstance(key, int | np.integer):
            if key < 0:
                raise IndexError(key)
            return hdul[int(key)]
        return hdul[str(key).strip().upper()] if str(key).upper() != "PRIMARY" else hdul[0]
    except (KeyError, IndexError):
        raise FitsValidationError(
            f"FITS file {path}: extension {extension!r} not found. Available HDUs: "
            f"{_describe_hdus(hdul)}. Fix: set 'fits_extensions' to one of these names or "
            "numbers."
        ) from None


def _data_end_offset(hdu) -> int | None:
    """Byte offset where the HDU's data must end (without padding), or None if unknown."""
    from astropy.io import fits

    info = hdu.fileinfo()
    if info is None:
        return None
    if isinstance(hdu, fits.CompImageHDU):
        try:
            header = hdu._bintable.header  # the compressed table: rows + heap size
            nbytes = header["NAXIS1"] * header["NAXIS2"] + header.get("PCOUNT", 0)
        except Exception:  # private API changed: fall back to the padded span
            return info["datLoc"] + max(0, info["datSpan"] - (_FITS_BLOCK - 1))
    else:
        nbytes = hdu.size
    return info["datLoc"] + nbytes


@dataclass
class ImageHandle:
    """An open image HDU whose pixels are read window by window.

    Attributes
    ----------
    path : Path
        The FITS file.
    extension : str or int
        The HDU as requested (name or index).
    shape : tuple of int
        ``(ny, nx)`` of the image (numpy order).
    wcs : astropy.wcs.WCS or None
        The celestial WCS of the image (2 pixel axes); None for an image mapped from its
        layout (:func:`map_image`), whose positions were computed when the layout was made.
    pixel_scale_arcsec : float
        Mean side of a pixel on the sky in arcsec (from ``proj_plane_pixel_scales``).
    header : astropy.io.fits.Header or dict
        The HDU's header (for compressed images: the image header); for a mapped image, a dict
        of the keywords its layout kept (the flux zero point).
    bunit : str or None
        The ``BUNIT`` keyword, if present.
    """

    path: Path
    extension: str | int
    shape: tuple[int, int]
    wcs: WCS | None
    pixel_scale_arcsec: float
    header: fits.Header | dict
    bunit: str | None
    _hdul: fits.HDUList | None = field(repr=False)
    _hdu: object = field(repr=False)
    _data: np.ndarray | None = field(repr=False, default=None)  # the memory map (uncompressed)
    _mapping: object = field(repr=False, default=None)  # map_image's mmap (for madvise)
    _compressed: bool = field(repr=False, default=False)
    _template_state: dict | None = field(repr=False, default=None)
    _template: CutoutHeaderTemplate | None = field(repr=False, default=None)
    _leading_index: tuple[int, ...] = field(repr=False, default=())
    _bscale: float = field(repr=False, default=1.0)
    _bzero: float = field(repr=False, default=0.0)
    _blank: int | None = field(repr=False, default=None)
    _blocks: _BlockCache | None = field(repr=False, default=None)
    _mapped_pages: int = field(repr=False, default=0)
    _page_map: np.ndarray | None = field(repr=False, default=None)

    @property
    def compressed(self) -> bool:
        """True when the image is tile-compressed (read through ``section``)."""
        return self._compressed

    def _pixels(self) -> np.ndarray:
        """The image array (a memory map; astropy's is made on first use, as before)."""
        if self._data is None and self._hdu is not None and not self._compressed:
            self._data = self._hdu.data
        return self._data

    def cutout_header_template(self) -> CutoutHeaderTemplate:
        """The :class:`~cutana.wcs_utils.CutoutHeaderTemplate` of this image (made once)."""
        from .wcs_utils import CutoutHeaderTemplate

        if self._template is None:
            if self._template_state is not None:
                self._template = CutoutHeaderTemplate.from_state(self._template_state)
            else:
                self._template = CutoutHeaderTemplate(self.wcs)
        return self._template

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read the window ``[y0:y1, x0:x1]`` as float32 (scaled, BLANK -> NaN).

        Parameters
        ----------
        y0, y1, x0, x1 : int
            Window bounds in 0-based array indices, inside the image (``0 <= y0 <= y1 <= ny``).

        Returns
        -------
        ndarray of float32, shape (y1 - y0, x1 - x0)
            Physical pixel values; integer ``BLANK`` pixels are NaN.

        Raises
        ------
        FitsValidationError
            If the window lies outside the image or the data cannot be read.
        """
        ny, nx = self.shape
        if not (0 <= y0 <= y1 <= ny and 0 <= x0 <= x1 <= nx):
            raise FitsValidationError(
                f"FITS file {self.path}: window y[{y0}:{y1}] x[{x0}:{x1}] is outside the image "
                f"of shape {self.shape}. Fix: clip the window with extraction.stamp_windows."
            )
        key = self._leading_index + (slice(y0, y1), slice(x0, x1))
        try:
            if self.compressed:
                if self._blocks is None:
                    self._blocks = _BlockCache(self._hdu, self._hdu.shape, self._leading_index)
                raw = self._blocks.read(y0, y1, x0, x1)
            else:
                raw = self._pixels()[key]
            raw = np.asarray(raw)
        except Exception as error:
            raise FitsValidationError(
                f"FITS file {self.path} [{self.extension}]: cannot read window y[{y0}:{y1}] "
                f"x[{x0}:{x1}]: {error}. Fix: check that the file is complete and not corrupt."
            ) from error
        if self._bscale == 1.0 and self._bzero == 0.0:
            window = raw.astype(np.float32)
        else:
            # Scale in float64 and round once, so int32 data with a large BZERO keeps precision.
            window = (raw * self._bscale + self._bzero).astype(np.float32)
        if self._blank is not None and np.issubdtype(raw.dtype, np.integer):
            window[raw == self._blank] = np.nan
        return window

    def read_into(self, out: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> None:
        """Like :meth:`read`, but write the window into ``out`` (shape ``(y1-y0, x1-x0)``).

        Unscaled, uncompressed images are copied from the memory map straight into ``out``
        (byte-swapped on the way), without the temporary array of :meth:`read`.
        """
        ny, nx = self.shape
        plain = (
            not self.compressed
            and self._bscale == 1.0
            and self._bzero == 0.0
            and 0 <= y0 <= y1 <= ny
            and 0 <= x0 <= x1 <= nx
        )
        if not self.compressed:
            self._account_pages(y0, y1, x0, x1)
        if plain:
            try:
                raw = self._pixels()[self._leading_index + (slice(y0, y1), slice(x0, x1))]
            except Exception:  # noqa: BLE001 - read() reports the error with its message
                plain = False
            else:
                if self._blank is None or not np.issubdtype(raw.dtype, np.integer):
                    out[...] = raw
                    return
        out[...] = self.read(y0, y1, x0, x1)

    def _account_pages(self, y0: int, y1: int, x0: int, x1: int) -> None:
        """Count the distinct pages the reads map; past :data:`MAPPED_PAGES_BUDGET`, unmap them.

        Neighbouring stamps share pages, so counting each page once (a bitmap of image rows x
        4 KiB column blocks) lets a batch fault each page about once, while its resident
        memory stays bounded by the budget, not by the area of the mosaic its stamps cover.
        """
        itemsize = 8  # an upper bound of the pixel size (BITPIX up to 64)
        if self._page_map is None:
            self._page_map = np.zeros(
                (self.shape[0], self.shape[1] * itemsize // 4096 + 2), dtype=bool
            )
        block = self._page_map[y0:y1, x0 * itemsize // 4096 : x1 * itemsize // 4096 + 1]
        self._mapped_pages += block.size - int(np.count_nonzero(block))
        block[...] = True
        if self._mapped_pages >= MAPPED_PAGES_BUDGET:
            self.release_pages()

    def release_pages(self) -> None:
        """Unmap the pages of a memory-mapped image that reads have touched so far.

        Pages of a memory map stay in the process's resident set once read, so a batch whose
        stamps are spread over a large mosaic would grow its RSS with the mosaic's area. The
        pages stay in the OS page cache (a later read maps them again cheaply); only this
        process's claim on them goes. A no-op for compressed images and where ``madvise`` is
        unavailable.
        """
        if self._hdul is not None:
            mapping = getattr(getattr(self._hdul, "_file", None), "_mmap", None)
        else:
            mapping = self._mapping
        self._mapped_pages = 0
        if self._page_map is not None:
            self._page_map[...] = False
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self) -> None:
        """Close the file (and its memory map) and drop cached blocks."""
        self._blocks = None
        self._data = None
        self._mapping = None
        if self._hdul is not None:
            self._hdul.close()

    def __enter__(self) -> ImageHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _celestial_wcs(header: fits.Header, hdul: fits.HDUList, path: Path, extension) -> WCS:
    from astropy.utils.exceptions import AstropyWarning
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        # Non-standard but harmless keywords (e.g. RADECSYS, DATE-OBS fixes) are common.
        warnings.simplefilter("ignore", FITSFixedWarning)
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            wcs = WCS(header, fobj=hdul)
        except Exception as error:
            raise FitsValidationError(
                f"FITS file {path} [{extension}]: the WCS in the header is invalid: {error}. "
                "Fix: repair the CTYPE/CRPIX/CRVAL/CD keywords."
            ) from error
    if not wcs.has_celestial or wcs.celestial.naxis != 2:
        raise FitsValidationError(
            f"FITS file {path} [{extension}]: no celestial WCS (CTYPE1/2 = "
            f"{header.get('CTYPE1')!r}/{header.get('CTYPE2')!r}). Fix: use an image with "
            "RA/Dec WCS keywords (e.g. RA---TAN/DEC--TAN) or choose another extension."
        )
    if sorted((wcs.wcs.lng, wcs.wcs.lat)) != [0, 1]:
        raise FitsValidationError(
            f"FITS file {path} [{extension}]: the celestial axes are not the first two image "
            "axes. Fix: use an image whose NAXIS1/NAXIS2 are RA/Dec."
        )
    return wcs.celestial


def open_image(path: str | os.PathLike, extension: str | int = "PRIMARY") -> ImageHandle:
    """Open one image HDU lazily.

    Parameters
    ----------
    path : str or path-like
        The FITS file.
    extension : str or int
        HDU name (``"PRIMARY"``, ``"SCI"``, case-insensitive) or index (``0``, ``1``, ``"1"``).

    Returns
    -------
    ImageHandle
        Open handle; call ``close()`` (or use it as a context manager, or an ImageCache).

    Raises
    ------
    FitsValidationError
        If the file is missing, not FITS, truncated, the extension is missing, holds no 2-D
        image, or has no celestial WCS.
    """
    from astropy.io import fits
    from astropy.io.fits.verify import VerifyWarning
    from astropy.utils.exceptions import AstropyWarning
    from astropy.wcs.utils import proj_plane_pixel_scales

    path = Path(path)
    if not path.is_file():
        raise FitsValidationError(
            f"FITS file {path} does not exist (or is not a file). Fix: correct the path in the "
            "catalogue column 'fits_file_paths'."
        )
    if not os.access(path, os.R_OK):
        raise FitsValidationError(f"FITS file {path} is not readable. Fix: check permissions.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VerifyWarning)
        warnings.simplefilter("always", AstropyWarning)
        try:
            hdul = fits.open(path, memmap=True, do_not_scale_image_data=True, lazy_load_hdus=False)
        except Exception as error:
            reason = str(error)
            if "SIMPLE card" in reason:
                # astropy's advice (ignore_missing_simple=True) is for its own callers.
                reason = "it does not start with the SIMPLE card every FITS file starts with"
            raise FitsValidationError(
                f"FITS file {path} cannot be opened as FITS: {reason}. Fix: check that the "
                "path names the FITS image and that the file is complete and uncorrupted."
            ) from error
    truncation = [w for w in caught if "truncated" in str(w.message)]
    try:
        hdu = _select_hdu(hdul, extension, path)
        if not hdu.is_image or not hdu.shape:
            raise FitsValidationError(
                f"FITS file {path}: extension {extension!r} has no image data. Available HDUs: "
                f"{_describe_hdus(hdul)}. Fix: set 'fits_extensions' to an HDU with an image."
            )
        end = _data_end_offset(hdu)
        if truncation and (end is None or end > path.stat().st_size):
            raise FitsValidationError(
                f"FITS file {path} is truncated: extension {extension!r} needs {end} bytes but "
                f"the file has {path.stat().st_size}. Fix: re-copy or re-download the file."
            )
        shape = tuple(int(n) for n in hdu.shape)
        extra = shape[:-2]
        if len(shape) < 2 or any(n != 1 for n in extra):
            raise FitsValidationError(
                f"FITS file {path}: extension {extension!r} has shape {shape}; a 2-D image "
                "(extra axes of length 1 allowed) is needed. Fix: choose a 2-D image HDU."
            )
        header = hdu.header
        wcs = _celestial_wcs(header, hdul, path, extension)
        scales = proj_plane_pixel_scales(wcs) * 3600.0
        pixel_scale = float(np.mean(scales))
        if not np.isfinite(pixel_scale) or pixel_scale <= 0:
            raise FitsValidationError(
                f"FITS file {path} [{extension}]: pixel scale {scales} arcsec is not positive. "
                "Fix: repair the CD/CDELT keywords."
            )
        blank = header.get("BLANK")
        bunit = header.get("BUNIT")
        return ImageHandle(
            path=path,
            extension=extension,
            shape=(shape[-2], shape[-1]),
            wcs=wcs,
            pixel_scale_arcsec=pixel_scale,
            header=header,
            bunit=str(bunit) if bunit is not None else None,
            _hdul=hdul,
            _hdu=hdu,
            _compressed=isinstance(hdu, fits.CompImageHDU),
            _leading_index=(0,) * len(extra),
            _bscale=float(header.get("BSCALE", 1.0)),
            _bzero=float(header.get("BZERO", 0.0)),
            _blank=int(blank) if blank is not None and header.get("BITPIX", -32) > 0 else None,
        )
    except FitsValidationError:
        hdul.close()
        raise
    except Exception as error:
        hdul.close()
        raise FitsValidationError(
            f"FITS file {path} [{extension}]: cannot be used: {error}. Fix: check the file."
        ) from error


#: Version of the layout dicts of :func:`image_layout` (a job ignores other versions).
LAYOUT_VERSION = 1
#: Key of a batch Parquet's schema metadata holding one :func:`image_layout` per band (a JSON
#: list), written by ``split_catalogue`` together with :data:`POSITION_COLUMNS`.
LAYOUTS_METADATA_KEY = b"cutana.image_layouts"
#: Batch columns with each source's 0-based pixel position in each band's image (a list per
#: row, bands in order), computed by ``split_catalogue`` with the image's WCS.
POSITION_COLUMNS = ("pixel_x", "pixel_y")


def image_layout(handle: ImageHandle, keywords: tuple[str, ...] = ()) -> dict | None:
    """What a job needs to read an opened image without astropy, as JSON-able data.

    The data's byte offset, on-disk dtype and shape, scaling (``BSCALE``/``BZERO``/``BLANK``),
    ``BUNIT``, pixel scale, the cutout header template's state, the header ``keywords`` asked
    for (those present), and the file's size, mtime, ctime and inode, by which
    :func:`map_image` checks that the file has not changed since.

    Parameters
    ----------
    handle : ImageHandle
        An image opened with :func:`open_image`.
    keywords : tuple of str
        Header keywords to keep (the flux zero point's).

    Returns
    -------
    dict or None
        None when the image cannot be read that way: tile-compressed, a file astropy does not
        memory-map (gzip/bzip2/zip-compressed ``.fits.gz`` and the like), or a WCS whose cutout
        headers need astropy (the template's slow path).
    """
    if handle.compressed or handle._hdul is None:
        return None
    opened = getattr(handle._hdul, "_file", None)
    if not getattr(opened, "memmap", False) or getattr(opened, "compression", None):
        return None  # e.g. a .fits.gz: its data offset is one in the decompressed stream
    state = handle.cutout_header_template().to_state()
    info = handle._hdu.fileinfo()
    data = handle._pixels()
    if state is None or info is None or data is None or not data.flags.c_contiguous:
        return None
    stat = handle.path.stat()
    header = {}
    for keyword in keywords:
        if keyword in handle.header:
            value = handle.header[keyword]
            header[keyword] = value if isinstance(value, bool | int | float | str) else str(value)
    return {
        "version": LAYOUT_VERSION,
        "path": os.fspath(handle.path),
        "extension": handle.extension,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        # A rewrite that restores size and mtime (cp -p, rsync -t) still changes these two.
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
        "offset": int(info["datLoc"]),
        "dtype": data.dtype.str,
        "shape": [int(n) for n in data.shape],
        "bscale": handle._bscale,
        "bzero": handle._bzero,
        "blank": handle._blank,
        "bunit": handle.bunit,
        "pixel_scale_arcsec": handle.pixel_scale_arcsec,
        "header": header,
        "template": state,
    }


def map_image(layout: dict) -> ImageHandle | None:
    """Memory-map an image from its :func:`image_layout`, without astropy.

    Returns
    -------
    ImageHandle or None
        None when the layout is of another version or the file is gone or has changed (size,
        mtime, ctime or inode) since the layout was made: open it with :func:`open_image` then.
    """
    path = Path(layout["path"])
    try:
        stat = path.stat()
    except OSError:
        return None
    if (
        layout.get("version") != LAYOUT_VERSION
        or stat.st_size != layout["size"]
        or stat.st_mtime_ns != layout["mtime_ns"]
        or stat.st_ctime_ns != layout["ctime_ns"]
        or stat.st_ino != layout["inode"]
    ):
        return None
    shape = tuple(int(n) for n in layout["shape"])
    try:
        data = np.memmap(
            path,
            dtype=np.dtype(layout["dtype"]),
            mode="r",
            offset=int(layout["offset"]),
            shape=shape,
        )
    except (OSError, ValueError):
        return None
    return ImageHandle(
        path=path,
        extension=layout["extension"],
        shape=(shape[-2], shape[-1]),
        wcs=None,
        pixel_scale_arcsec=float(layout["pixel_scale_arcsec"]),
        header=dict(layout["header"]),
        bunit=layout["bunit"],
        _hdul=None,
        _hdu=None,
        # A plain ndarray view: slicing np.memmap makes a memmap object per stamp (~2 us).
        _data=data.view(np.ndarray),
        _mapping=getattr(data, "_mmap", None),
        _template_state=layout["template"],
        _leading_index=(0,) * (len(shape) - 2),
        _bscale=float(layout["bscale"]),
        _bzero=float(layout["bzero"]),
        _blank=None if layout["blank"] is None else int(layout["blank"]),
    )


def zeropoint(header: fits.Header, keyword: str, path: str | os.PathLike | None = None) -> float:
    """Return the AB zero point stored under ``keyword``.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header of the image HDU.
    keyword : str
        The keyword (``flux_conversion_keywords.AB_zeropoint``, default ``MAGZERO``).
    path : str or path-like, optional
        The file, named in error messages.

    Returns
    -------
    float

    Raises
    ------
    FitsValidationError
        If the keyword is missing or not a finite number.
    """
    where = f"FITS file {path}" if path is not None else "FITS header"
    if keyword not in header:
        raise FitsValidationError(
            f"{where}: zero-point keyword {keyword!r} is missing. Fix: add it to the header, set "
            "'flux_conversion_keywords.AB_zeropoint' to the right keyword, or set "
            "'apply_flux_conversion' to false."
        )
    value = header[keyword]
    try:
        result = float(value)
    except (TypeError, ValueError):
        result = float("nan")
    if not np.isfinite(result):
        raise FitsValidationError(
            f"{where}: zero-point keyword {keyword!r} = {value!r} is not a finite number. Fix: "
            "store the AB zero point as a number."
        )
    return result


def image_key(path: str | os.PathLike, extension: str | int) -> tuple[str, str]:
    """The key of an image in a file: its path and extension (names are case-insensitive)."""
    return (os.fspath(path), str(extension).upper())


class ImageCache:
    """Keep the images of one batch open, each ``(path, extension)`` opened once.

    Use as a context manager; all handles are closed on exit. A file that failed to open is
    remembered, and asking for it again raises the same error without touching the disk again.

    Parameters
    ----------
    layouts : iterable of dict, optional
        :func:`image_layout` results: those images are mapped with :func:`map_image` (no
        astropy) while their files are unchanged, others are opened with :func:`open_image`.
    """

    def __init__(self, layouts=None) -> None:
        self._handles: dict[tuple[str, str], ImageHandle] = {}
        self._errors: dict[tuple[str, str], FitsValidationError] = {}
        self._layouts = {
            image_key(layout["path"], layout["extension"]): layout for layout in layouts or ()
        }

    def get(self, path: str | os.PathLike, extension: str | int = "PRIMARY") -> ImageHandle:
        """Return the open handle of ``(path, extension)``, opening it on first use.

        Raises
        ------
        FitsValidationError
            As :func:`open_image`.
        """
        key = image_key(path, extension)
        if key in self._errors:
            raise self._errors[key]
        handle = self._handles.get(key)
        if handle is None and key in self._layouts:
            handle = map_image(self._layouts[key])
            if handle is not None:
                self._handles[key] = handle
        if handle is None:
            try:
                handle = open_image(path, extension)
            except FitsValidationError as error:
                self._errors[key] = error
                raise
            self._handles[key] = handle
        return handle

    def close(self) -> None:
        """Close every open handle."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> ImageCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
