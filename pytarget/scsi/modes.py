"""Mode pages (SPC-4 7.5, SBC-3 6.4): their current, changeable and default values.

Each page is three byte strings of the same length; MODE SELECT may change only the bits set in
the changeable mask and is rejected at the first other bit that differs, with a field pointer
into the parameter list. The device server reads the bits it honours (WCE, D_SENSE, SWP)
through the properties of `ModePages`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core import sense as S


@dataclass
class ModePage:
    code: int
    subpage: int
    default: bytes
    changeable: bytes
    current: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        assert len(self.default) == len(self.changeable)
        self.current = bytearray(self.default)

    def render(self, pc: int) -> bytes:
        if pc == 0:
            return bytes(self.current)
        if pc == 1:
            return self.changeable
        return self.default


def _page(code: int, body: bytes, changeable: bytes, subpage: int = 0) -> ModePage:
    """Build a page from its parameter bytes (everything after the page header)."""
    if subpage:
        header = bytes((code | 0x40, subpage)) + len(body).to_bytes(2, "big")
    else:
        header = bytes((code, len(body)))
    return ModePage(code, subpage, header + body, header + changeable)


PAGE_RW_ERROR_RECOVERY = 0x01
PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_INFORMATIONAL_EXCEPTIONS = 0x1C


def _default_pages() -> list[ModePage]:
    return [
        _page(PAGE_RW_ERROR_RECOVERY, bytes(10), bytes(10)),
        # Caching (SBC-3 6.4.5): WCE=1 by default; WCE and RCD changeable.
        _page(PAGE_CACHING, bytes((0x04,)) + bytes(17), bytes((0x05,)) + bytes(17)),
        # Control (SPC-4 7.5.7): QUEUE ALGORITHM MODIFIER=1 (unrestricted reordering);
        # D_SENSE and SWP changeable.
        _page(PAGE_CONTROL, bytes((0x00, 0x10, 0x00, 0x00, 0, 0, 0xFF, 0xFF, 0, 0)),
              bytes((0x04, 0x00, 0x08, 0x00, 0, 0, 0, 0, 0, 0))),
        # Informational exceptions control (SPC-4 7.5.11): DEXCPT=1 (reporting disabled).
        _page(PAGE_INFORMATIONAL_EXCEPTIONS, bytes((0x08, 0x00)) + bytes(8),
              bytes((0x99, 0x0F)) + b"\xff" * 8),
    ]


class ModePages:
    def __init__(self, lu: object) -> None:
        self.lu = lu
        self.pages = _default_pages()
        self._index = {(p.code, p.subpage): p for p in self.pages}
        # The current values of the two pages whose bits every command may read (changed in
        # place only, by MODE SELECT and reset).
        self._caching = self._index[(PAGE_CACHING, 0)].current
        self._control = self._index[(PAGE_CONTROL, 0)].current

    def reset(self) -> None:
        for page in self.pages:
            page.current[:] = page.default

    def get(self, code: int, subpage: int = 0) -> ModePage | None:
        return self._index.get((code, subpage))

    @property
    def write_cache(self) -> bool:
        return bool(self._caching[2] & 0x04)

    @property
    def d_sense(self) -> bool:
        return bool(self._control[2] & 0x04)

    @property
    def software_write_protect(self) -> bool:
        return bool(self._control[4] & 0x08)

    # ------------------------------------------------------------------ MODE SENSE
    def sense_pages(self, pc: int, code: int, subpage: int) -> bytes:
        """The pages a MODE SENSE asks for; INVALID FIELD IN CDB for unknown ones."""
        if code == 0x3F:
            if subpage not in (0x00, 0xFF):
                raise S.invalid_field_in_cdb(3, 7)
            chosen = [p for p in self.pages if subpage == 0xFF or p.subpage == 0]
        else:
            if subpage == 0xFF:
                chosen = [p for p in self.pages if p.code == code]
            else:
                page = self.get(code, subpage)
                chosen = [page] if page else []
            if not chosen:
                raise S.invalid_field_in_cdb(2 if subpage == 0 or self.get(code) is None else 3,
                                             5 if subpage == 0 or self.get(code) is None else 7)
        return b"".join(p.render(pc) for p in chosen)

    # ------------------------------------------------------------------ MODE SELECT
    def select(self, data: bytes, offset: int) -> bool:
        """Apply the pages in data (which starts at parameter-list byte `offset`).

        Validates every page before changing any; returns True when a value changed.
        """
        staged: list[tuple[ModePage, bytes]] = []
        pos = 0
        while pos < len(data):
            if len(data) - pos < 2:
                raise S.parameter_list_length_error()
            spf = bool(data[pos] & 0x40)
            code = data[pos] & 0x3F
            if spf:
                if len(data) - pos < 4:
                    raise S.parameter_list_length_error()
                subpage = data[pos + 1]
                length = int.from_bytes(data[pos + 2:pos + 4], "big") + 4
            else:
                subpage = 0
                length = data[pos + 1] + 2
            page = self.get(code, subpage)
            if page is None:
                raise S.invalid_field_in_parameter_list(offset + pos, 5)
            if length != len(page.default):
                raise S.invalid_field_in_parameter_list(offset + pos + (3 if spf else 1), 7)
            if pos + length > len(data):
                raise S.parameter_list_length_error()
            new = data[pos:pos + length]
            header = 4 if spf else 2
            for i in range(header, length):
                bad = (new[i] ^ page.current[i]) & ~page.changeable[i] & 0xFF
                if bad:
                    raise S.invalid_field_in_parameter_list(offset + pos + i, bad.bit_length() - 1)
            staged.append((page, new))
            pos += length
        changed = False
        for page, new in staged:
            header = 4 if page.subpage else 2
            if page.current[header:] != new[header:]:
                page.current[header:] = new[header:]
                changed = True
        return changed
