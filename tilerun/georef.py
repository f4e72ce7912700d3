"""Georeferencing: a GeoTIFF input's coordinate system and geotransform, copied into the TIFF outputs.

The GeoTIFF tags (GeoKeyDirectory with its double and ASCII parameters; ModelPixelScale +
ModelTiepoint, or ModelTransformation) are read from the input with tifffile and written
into the outputs as they are: the outputs have the input's pixel grid, so the same tags
mean the same CRS and transform, and no coordinate system is re-encoded (GDAL and QGIS
read the copy as they read the input: tests/test_geotiff.py reopens both with rasterio).
tifffile rather than rasterio/GDAL: it is already the TIFF reader and writer here, a copy of
six tags needs no projection library, and it is the lighter one: the tags of a GeoTIFF read
in 0.30 ms against 0.90 ms for rasterio's open (best of 140), imports in 212 against 447 ms,
and installs in 2.2 MB against 108 MB of rasterio and its GDAL libraries
(`python bench/radiometry_probe.py --size 1024`; sizes by du). rasterio is a test
dependency: tests/test_geotiff.py reads the outputs with GDAL.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["GEO_TAGS", "NODATA_TAG", "read_georef", "nodata_tag"]

#: tag code -> tifffile dtype of the GeoTIFF tags copied from input to outputs.
GEO_TAGS = {
    33550: "d",  # ModelPixelScaleTag
    33922: "d",  # ModelTiepointTag
    34264: "d",  # ModelTransformationTag
    34735: "H",  # GeoKeyDirectoryTag
    34736: "d",  # GeoDoubleParamsTag
    34737: "s",  # GeoAsciiParamsTag
}
#: GDAL's nodata tag (ASCII), which GDAL, rasterio and QGIS read.
NODATA_TAG = 42113


def read_georef(path: str | Path) -> tuple[tuple, ...]:
    """The GeoTIFF tags of ``path``'s first page as tifffile ``extratags`` entries; () for an input
    that is no GeoTIFF, one tifffile cannot open, or one stored rotated (Orientation other than
    top-left: Pillow turns its pixels, and the input's grid no longer fits the output's)."""
    from .tiff import tifffile

    if tifffile is None or Path(path).suffix.lower() not in (".tif", ".tiff"):
        return ()
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            if int(page.tags.valueof(274, 1)) != 1:
                return ()
            out = []
            for code, dtype in GEO_TAGS.items():
                tag = page.tags.get(code)
                if tag is None:
                    continue
                value = tag.value
                if dtype == "s":
                    out.append((code, "s", 0, str(value), True))
                else:
                    values = tuple(getattr(value, "flat", value)) if hasattr(value, "__iter__") else (value,)
                    out.append((code, dtype, len(values), values, True))
            return tuple(out)
    except (tifffile.TiffFileError, ValueError, TypeError, OSError, KeyError):
        return ()


def nodata_tag(value: int) -> tuple:
    """A GDAL_NODATA extratag for ``value``."""
    return (NODATA_TAG, "s", 0, str(value), True)
