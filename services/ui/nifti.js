// A NIfTI-1 reader for display: header fields the viewer needs and the voxel array (x fastest).
// Gzip is undone with the browser's own DecompressionStream; nothing is fetched from elsewhere.

const TYPES = {
  2: Uint8Array, 4: Int16Array, 8: Int32Array, 16: Float32Array, 64: Float64Array,
  256: Int8Array, 512: Uint16Array, 768: Uint32Array,
};

async function gunzip(buffer) {
  const stream = new Blob([buffer]).stream().pipeThrough(new DecompressionStream("gzip"));
  return await new Response(stream).arrayBuffer();
}

export async function readNifti(buffer) {
  let bytes = new Uint8Array(buffer);
  if (bytes[0] === 0x1f && bytes[1] === 0x8b) buffer = await gunzip(buffer);
  const view = new DataView(buffer);
  let little = true;
  if (view.getInt32(0, true) !== 348) {
    if (view.getInt32(0, false) !== 348) throw new Error("not a NIfTI-1 file");
    little = false;
  }
  const dims = [1, 2, 3].map((i) => view.getInt16(40 + 2 * i, little));
  const datatype = view.getInt16(70, little);
  const pixdim = [1, 2, 3].map((i) => view.getFloat32(76 + 4 * i, little));
  const voxOffset = Math.max(352, Math.round(view.getFloat32(108, little)));
  const Type = TYPES[datatype];
  if (!Type) throw new Error(`NIfTI datatype ${datatype} is not supported by the viewer`);
  const count = dims[0] * dims[1] * dims[2];
  let data;
  if (little && voxOffset % Type.BYTES_PER_ELEMENT === 0) {
    data = new Type(buffer, voxOffset, count);
  } else {
    data = new Type(count);
    const size = Type.BYTES_PER_ELEMENT;
    const getter = { 1: "getUint8", 2: datatype === 4 ? "getInt16" : "getUint16", 4: datatype === 16 ? "getFloat32" : "getInt32", 8: "getFloat64" }[size];
    for (let i = 0; i < count; i++) data[i] = view[getter](voxOffset + i * size, little);
  }
  const slope = view.getFloat32(112, little);
  const inter = view.getFloat32(116, little);
  return { dims, pixdim, data, slope: slope || 1, inter: inter || 0 };
}

export function base64ToBuffer(b64) {
  const raw = atob(b64);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out.buffer;
}
