"""Packing per-coordinate code indices and sign bits into bytes, and back.

Layout (one packed row; every kernel decodes this and nothing else):

* A code of ``b`` bits per coordinate is split into *fields* of width 4, 2 and 1 bits
  (8 for ``b = 8``), the binary decomposition of ``b``, lowest bits in the widest field.
  ``b = 3`` is a 2-bit field (bits 0-1 of each index) and a 1-bit field (bit 2).
* Each field covers a contiguous prefix of coordinates ``[0, stop)`` and packs them
  ``8 // width`` to a byte, little-endian: coordinate ``j`` of the field sits in byte
  ``offset + j // (8 // width)`` at bit ``(j % (8 // width)) * width``. A field is padded to
  whole bytes, so every field starts on a byte boundary and no value crosses a byte.
* A fractional budget (e.g. 2.5 bits) gives the first ``extra_coords`` coordinates one more
  bit: one more 1-bit field whose prefix is ``[0, extra_coords)``.
* The QJL sign bits of ``variant="prod"`` come last, as a 1-bit field over all coordinates
  (bit set = sign +1).

Decoding is shift-and-mask on whole bytes for every width, which is what the CPU and the
Triton scans do.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Field:
    """``width``-bit slices (bits ``shift .. shift+width-1``) of the first ``stop`` coordinates."""

    stop: int
    width: int
    shift: int
    offset: int

    @property
    def per_byte(self) -> int:
        return 8 // self.width

    @property
    def nbytes(self) -> int:
        return -(-self.stop // self.per_byte)


def _split_widths(bits: int) -> list[int]:
    """The field widths that make up a ``bits``-bit index, widest first: 7 -> [4, 2, 1]."""
    if bits == 8:
        return [8]
    return [w for w in (4, 2, 1) if bits & w]


@dataclass(frozen=True)
class BitLayout:
    """Where each bit of each coordinate lives in a packed row.

    ``dim`` coordinates carry ``base_bits`` bits each, the first ``extra_coords`` of them one
    more, and, with ``signs``, one QJL sign bit each.
    """

    dim: int
    base_bits: int
    extra_coords: int = 0
    signs: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.base_bits <= 8 or (self.extra_coords and self.base_bits == 8):
            raise ValueError(f"index widths must stay within 0..8 bits, got base_bits={self.base_bits}")
        if not 0 <= self.extra_coords <= self.dim:
            raise ValueError(f"extra_coords must be in 0..{self.dim}, got {self.extra_coords}")

    @cached_property
    def index_fields(self) -> tuple[Field, ...]:
        """The fields that hold code indices, in byte order."""
        fields, shift, offset = [], 0, 0
        plan = [(w, self.dim) for w in _split_widths(self.base_bits)] if self.base_bits else []
        if self.extra_coords:
            plan.append((1, self.extra_coords))
        for width, stop in plan:
            field = Field(stop=stop, width=width, shift=shift, offset=offset)
            fields.append(field)
            shift, offset = shift + width, offset + field.nbytes
        return tuple(fields)

    @cached_property
    def sign_field(self) -> Field | None:
        """The field of QJL sign bits, or None without signs."""
        if not self.signs:
            return None
        return Field(stop=self.dim, width=1, shift=0, offset=self._index_bytes)

    @property
    def _index_bytes(self) -> int:
        return sum(f.nbytes for f in self.index_fields)

    @property
    def code_bytes(self) -> int:
        """Bytes per packed row."""
        return self._index_bytes + (self.sign_field.nbytes if self.sign_field else 0)

    def pack(self, indices: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
        """Pack indices (uint8 ``(n, dim)``) and signs (bool ``(n, dim)``) -> uint8 ``(n, code_bytes)``."""
        if indices.shape[1:] != (self.dim,):
            raise ValueError(f"indices must have shape (n, {self.dim}), got {tuple(indices.shape)}")
        if (signs is None) == self.signs:
            raise ValueError("signs must be given exactly when the layout has a sign field")
        n = indices.shape[0]
        out = torch.zeros((n, self.code_bytes), dtype=torch.uint8, device=indices.device)
        for field in self.index_fields:
            _pack_field(out, (indices[:, : field.stop] >> field.shift), field)
        if self.sign_field is not None:
            _pack_field(out, signs.to(torch.uint8), self.sign_field)
        return out

    def unpack_indices(self, packed: torch.Tensor) -> torch.Tensor:
        """uint8 ``(n, code_bytes)`` -> uint8 ``(n, dim)`` code indices."""
        self._check_packed(packed)
        indices = torch.zeros((packed.shape[0], self.dim), dtype=torch.uint8, device=packed.device)
        for field in self.index_fields:
            indices[:, : field.stop] |= _unpack_field(packed, field) << field.shift
        return indices

    def unpack_signs(self, packed: torch.Tensor) -> torch.Tensor:
        """uint8 ``(n, code_bytes)`` -> bool ``(n, dim)``, True where the QJL sign is +1."""
        self._check_packed(packed)
        if self.sign_field is None:
            raise ValueError("this layout has no sign bits")
        return _unpack_field(packed, self.sign_field).bool()

    def _check_packed(self, packed: torch.Tensor) -> None:
        if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != self.code_bytes:
            raise ValueError(
                f"packed codes must be uint8 of shape (n, {self.code_bytes}), "
                f"got {packed.dtype} {tuple(packed.shape)}"
            )


def _pack_field(out: torch.Tensor, values: torch.Tensor, field: Field) -> None:
    """OR the low ``field.width`` bits of ``values`` (``(n, field.stop)``) into ``out``'s bytes."""
    n, per_byte = values.shape[0], field.per_byte
    padded = torch.zeros((n, field.nbytes * per_byte), dtype=torch.uint8, device=values.device)
    padded[:, : field.stop] = values[:, : field.stop] & ((1 << field.width) - 1)
    grouped = padded.view(n, field.nbytes, per_byte)
    packed = torch.zeros((n, field.nbytes), dtype=torch.uint8, device=values.device)
    for slot in range(per_byte):
        packed |= grouped[:, :, slot] << (slot * field.width)
    out[:, field.offset : field.offset + field.nbytes] = packed


def _unpack_field(packed: torch.Tensor, field: Field) -> torch.Tensor:
    """The ``field.width``-bit values of the field's coordinates, uint8 ``(n, field.stop)``."""
    chunk = packed[:, field.offset : field.offset + field.nbytes]
    shifts = torch.arange(0, 8, field.width, dtype=torch.uint8, device=packed.device)
    values = (chunk.unsqueeze(-1) >> shifts) & ((1 << field.width) - 1)
    return values.reshape(packed.shape[0], field.nbytes * field.per_byte)[:, : field.stop]
