// The tri-planar slice viewer: one modality with window/level, the segmentation overlay (BraTS labels
// 1 NCR, 2 ED, 4 ET) at a chosen opacity, and the localization box. Voxel order is x fastest (NIfTI);
// rows are drawn with +y / +z up, as radiology viewers show RAS volumes.

export const LABEL_COLOURS = { 1: [230, 40, 40], 2: [40, 200, 60], 4: [250, 220, 30] };
const BOX_COLOUR = "#3fa9ff";
const PLANES = {
  axial: { fixed: 2, u: 0, v: 1 },
  coronal: { fixed: 1, u: 0, v: 2 },
  sagittal: { fixed: 0, u: 1, v: 2 },
};

export class SliceViewer {
  constructor(doc) {
    this.doc = doc;
    this.images = {};
    this.mask = null;
    this.box = null;
    this.modality = null;
    this.slices = {};
  }

  load(images, mask, box) {
    this.images = images;
    this.mask = mask;
    this.box = box;
    const first = Object.values(images)[0] || mask;
    this.dims = first.dims;
    this.modality = Object.keys(images)[0] || null;
    const centre = box ? [0, 1, 2].map((a) => Math.round((box[a] + box[a + 3]) / 2)) : this.dims.map((d) => Math.floor(d / 2));
    for (const [name, p] of Object.entries(PLANES)) {
      const slider = this.doc.getElementById(`slice-${name}`);
      slider.max = String(this.dims[p.fixed] - 1);
      slider.value = String(Math.min(Math.max(centre[p.fixed], 0), this.dims[p.fixed] - 1));
      this.slices[name] = Number(slider.value);
    }
  }

  setSlice(plane, index) {
    this.slices[plane] = index;
    this.drawPlane(plane);
  }

  settings() {
    const val = (id) => Number(this.doc.getElementById(id).value);
    return {
      window: val("window"), level: val("level"), opacity: val("opacity") / 100,
      overlay: this.doc.getElementById("show-overlay").checked, showBox: this.doc.getElementById("show-box").checked,
    };
  }

  draw() {
    for (const plane of Object.keys(PLANES)) this.drawPlane(plane);
  }

  drawPlane(name) {
    const p = PLANES[name];
    const canvas = this.doc.getElementById(`canvas-${name}`);
    const [nx, ny] = [this.dims[p.u], this.dims[p.v]];
    canvas.width = nx;
    canvas.height = ny;
    const ctx = canvas.getContext("2d");
    const out = ctx.createImageData(nx, ny);
    const s = this.settings();
    const image = this.images[this.modality];
    const lo = s.level - s.window / 2;
    const idx = [0, 0, 0];
    idx[p.fixed] = this.slices[name];
    const [dx, dy] = [this.dims[0], this.dims[0] * this.dims[1]];
    let labelled = 0;
    for (let v = 0; v < ny; v++) {
      for (let u = 0; u < nx; u++) {
        idx[p.u] = u;
        idx[p.v] = v;
        const i = idx[0] + idx[1] * dx + idx[2] * dy;
        const grey = image ? Math.max(0, Math.min(255, ((image.data[i] * image.slope + image.inter - lo) / s.window) * 255)) : 0;
        let [r, g, b] = [grey, grey, grey];
        const label = this.mask ? this.mask.data[i] : 0;
        if (s.overlay && label && LABEL_COLOURS[label]) {
          const c = LABEL_COLOURS[label];
          r = r * (1 - s.opacity) + c[0] * s.opacity;
          g = g * (1 - s.opacity) + c[1] * s.opacity;
          b = b * (1 - s.opacity) + c[2] * s.opacity;
          labelled++;
        }
        const o = ((ny - 1 - v) * nx + u) * 4; // +v up
        out.data[o] = r;
        out.data[o + 1] = g;
        out.data[o + 2] = b;
        out.data[o + 3] = 255;
      }
    }
    ctx.putImageData(out, 0, 0);
    const box = this.box;
    const inBox = box && this.slices[name] >= box[p.fixed] && this.slices[name] <= box[p.fixed + 3];
    if (s.showBox && inBox) {
      ctx.strokeStyle = BOX_COLOUR;
      ctx.lineWidth = 1;
      const x0 = box[p.u], x1 = box[p.u + 3] + 1, y0 = box[p.v], y1 = box[p.v + 3] + 1;
      ctx.strokeRect(x0 + 0.5, ny - y1 + 0.5, x1 - x0 - 1, y1 - y0 - 1);
    }
    canvas.dataset.labelledPixels = String(labelled);
    canvas.setAttribute("aria-label", `${name[0].toUpperCase()}${name.slice(1)} slice ${this.slices[name] + 1} of ${this.dims[p.fixed]}` +
      (labelled ? `, ${labelled} tumour pixels outlined` : "") + (s.showBox && inBox ? ", inside the localization box" : ""));
  }
}
