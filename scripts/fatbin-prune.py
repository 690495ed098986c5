#!/usr/bin/env python3
"""Keeps one GPU architecture's kernels in a shared library's CUDA fat binaries, in place.

ONNX Runtime's CUDA provider carries machine code for sm_75 to sm_120 (218 of its 284 MB, already compressed, so xz
barely shrinks it); a machine with one kind of GPU runs only the code built for its own architecture (machine code
does not run across major versions, and this build carries no PTX). In every fat binary of the .nv_fatbin section
that holds code for ARCH, the entries for ARCH are moved to its front, its size is set to theirs and the bytes behind
are zeroed: the file keeps its size and layout (nothing else moves), the kept entries are byte for byte the original
ones, and what a loader finds is what a build for ARCH alone would hold. A fat binary with no entry for ARCH is left
as it is. Zeroed bytes compress to nothing.

usage: fatbin-prune.py --arch 90 LIBRARY
"""
import argparse
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
BLOB_HEADER = struct.Struct('<IHHQ')      # magic, version, header size, size of the entries behind the header
ENTRY_HEADER = struct.Struct('<HHIQ')     # kind, version, header size, payload size (the arch is at byte 28)


def section(data, name):
    """(offset, size) of an ELF64 little-endian section."""
    if data[:4] != b'\x7fELF' or data[4] != 2 or data[5] != 1:
        sys.exit('fatbin-prune: not a 64-bit little-endian ELF file')
    shoff, = struct.unpack_from('<Q', data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 0x3A)
    headers = [struct.unpack_from('<IIQQQQ', data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    for name_index, _type, _flags, _addr, offset, size in headers:
        end = data.index(b'\0', names_offset + name_index)
        if data[names_offset + name_index:end].decode() == name:
            return offset, size
    sys.exit(f'fatbin-prune: no {name} section (no CUDA code in this file)')


def entries(data, blob):
    """[(start, length, arch)] of the entries of the fat binary at offset blob."""
    _magic, _version, header_size, size = BLOB_HEADER.unpack_from(data, blob)
    result, at, end = [], blob + header_size, blob + header_size + size
    while at < end:
        _kind, _version, entry_header_size, payload_size = ENTRY_HEADER.unpack_from(data, at)
        arch, = struct.unpack_from('<I', data, at + 28)
        result.append((at, entry_header_size + payload_size, arch))
        at += entry_header_size + payload_size
    if at != end:
        sys.exit(f'fatbin-prune: the fat binary at {blob:#x} does not end where its header says; file left as it was')
    return result


def blobs(data, offset, size):
    """Offsets of the fat binaries in the section (8-byte aligned, zero words between them allowed)."""
    at, end = offset, offset + size
    while at < end:
        magic, = struct.unpack_from('<I', data, at)
        if magic == FATBIN_MAGIC:
            yield at
            _magic, _version, header_size, blob_size = BLOB_HEADER.unpack_from(data, at)
            at += header_size + blob_size
        elif data[at:at + 8] == bytes(8):
            at += 8
        else:
            sys.exit(f'fatbin-prune: unknown bytes at {at:#x} in .nv_fatbin; file left as it was')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, required=True, help='compute capability times ten: 90 for H100/H200')
    parser.add_argument('library')
    args = parser.parse_args()

    with open(args.library, 'rb') as f:
        data = bytearray(f.read())
    offset, size = section(data, '.nv_fatbin')
    found = list(blobs(data, offset, size))
    plans = [(blob, entries(data, blob)) for blob in found]    # every fat binary parsed before anything changes
    kept = dropped = untouched = zeroed = 0
    for blob, items in plans:
        keep = [(start, length) for start, length, arch in items if arch == args.arch]
        if not keep:
            untouched += 1
            continue
        _magic, _version, header_size, blob_size = BLOB_HEADER.unpack_from(data, blob)
        body = b''.join(bytes(data[start:start + length]) for start, length in keep)
        first = blob + header_size
        data[first:first + blob_size] = body + bytes(blob_size - len(body))
        struct.pack_into('<Q', data, blob + 8, len(body))
        kept += len(keep)
        dropped += len(items) - len(keep)
        zeroed += blob_size - len(body)
    if kept == 0:
        sys.exit(f'fatbin-prune: no code for sm_{args.arch} in {args.library}; file left as it was')
    with open(args.library, 'wb') as f:
        f.write(data)
    print(f'fatbin-prune: {args.library}: kept {kept} sm_{args.arch} entries, dropped {dropped} of other architectures '
          f'({zeroed / 1e6:.1f} MB zeroed) in {len(found) - untouched} fat binaries; {untouched} without sm_{args.arch} left whole')


if __name__ == '__main__':
    main()
