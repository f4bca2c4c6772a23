// budget3d web viewer: the NeLF (onnxruntime-web, WASM) and the splats (Spark on three.js) from one camera.
//
// Camera convention: three.js cameras use OpenGL axes (x right, y up, looking down -z); the NeLF
// graph takes an OpenCV camera-to-world matrix (x right, y down, z forward), so
// c2w_cv = c2w_gl * diag(1, -1, -1, 1). The projection matrix is built from the NeLF's
// intrinsics, so both renderers see exactly the same view.
//
// Level of detail: when config.json has "lod", the splats come from one budget-ordered .splat
// stream whose byte prefixes are the levels (budget3d export RUN --lod). The page shows the
// smallest level as soon as its bytes are in, and swaps in the next once its bytes are in and the
// current level's frame time (median interval between animation frames) is within the target
// (config lod.target_ms, or ?lod_ms= in the URL). A level whose frames take more than 1.15x the
// target is given back for the one below and not tried again, so the page does not oscillate.
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import * as ort from "onnxruntime-web";

const b3d = (window.b3d = {
  state: "loading", error: null, splatError: null, mode: "nelf",
  frames: [], splatTimes: [], nelfCount: 0, splatCount: 0, config: null, lod: null,
});
const $ = (id) => document.getElementById(id);
const median = (xs) => {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : 0.5 * (s[s.length / 2 - 1] + s[s.length / 2]);
};

function projectionFromK(fx, fy, cx, cy, w, h, near, far) {
  // OpenCV pinhole (pixel centres at +0.5, rows down) -> OpenGL clip space; Matrix4.set is row-major
  return new THREE.Matrix4().set(
    (2 * fx) / w, 0, 1 - (2 * cx) / w, 0,
    0, (2 * fy) / h, (2 * cy) / h - 1, 0,
    0, 0, -(far + near) / (far - near), (-2 * far * near) / (far - near),
    0, 0, -1, 0);
}

function c2wFromCamera(camera) {
  camera.updateMatrixWorld(true);
  const e = camera.matrixWorld.elements; // column-major
  return Float32Array.from([
    e[0], -e[4], -e[8], e[12],
    e[1], -e[5], -e[9], e[13],
    e[2], -e[6], -e[10], e[14],
    0, 0, 0, 1]);
}

function setCameraFromC2W(camera, c2w) {
  const r = (i, j) => c2w[i][j];
  const m = new THREE.Matrix4().set(
    r(0, 0), -r(0, 1), -r(0, 2), r(0, 3),
    r(1, 0), -r(1, 1), -r(1, 2), r(1, 3),
    r(2, 0), -r(2, 1), -r(2, 2), r(2, 3),
    0, 0, 0, 1);
  m.decompose(camera.position, camera.quaternion, camera.scale);
  camera.updateMatrixWorld(true);
}

async function start() {
  const cfg = (b3d.config = await (await fetch("config.json", { cache: "no-cache" })).json());
  const W = cfg.nelf.width, H = cfg.nelf.height;
  const [fx, fy, cx, cy] = cfg.nelf.intrinsics;
  const bg = cfg.background || [1, 1, 1];
  document.title = `budget3d: ${cfg.title}`;

  // ---- layout: one view with the NeLF's aspect ratio, as large as the window allows
  const view = $("view"), nelfCanvas = $("nelf"), splatCanvas = $("splats"), hud = $("hud");
  nelfCanvas.width = W;
  nelfCanvas.height = H;
  const ctx = nelfCanvas.getContext("2d");
  let renderer = null;
  function layout() {
    const availW = window.innerWidth;
    const availH = window.innerHeight - $("bar").offsetHeight - $("msg").offsetHeight;
    const w = Math.max(64, Math.floor(Math.min(availW, (availH * W) / H)));
    const h = Math.round((w * H) / W);
    view.style.width = `${w}px`;
    view.style.height = `${h}px`;
    if (renderer) renderer.setSize(w, h, false);
  }
  window.addEventListener("resize", layout);
  layout();

  // ---- camera and orbit controls (pointer events: mouse and touch)
  const cam = cfg.camera;
  const camera = new THREE.PerspectiveCamera((2 * Math.atan(H / (2 * fy)) * 180) / Math.PI,
    (W / fx) / (H / fy), cam.near, cam.far);
  const proj = projectionFromK(fx, fy, cx, cy, W, H, cam.near, cam.far);
  camera.updateProjectionMatrix = function () {
    this.projectionMatrix.copy(proj);
    this.projectionMatrixInverse.copy(proj).invert();
  };
  camera.updateProjectionMatrix();
  camera.up.set(...cam.up);
  const controls = new OrbitControls(camera, view);
  controls.enableDamping = false;
  controls.screenSpacePanning = true;
  function resetCamera() {
    camera.position.set(cam.c2w[0][3], cam.c2w[1][3], cam.c2w[2][3]);
    controls.target.set(...cam.target);
    controls.update();
  }
  resetCamera();

  // ---- NeLF: onnxruntime-web on its WASM backend, one thread (as the native 1-thread figure)
  ort.env.wasm.numThreads = cfg.threads || 1;
  ort.env.logLevel = "error";
  const modelBytes = new Uint8Array(await (await fetch(cfg.nelf.file)).arrayBuffer());
  const session = await ort.InferenceSession.create(modelBytes, {
    executionProviders: ["wasm"], graphOptimizationLevel: "all",
  });
  const image = ctx.createImageData(W, H);
  let hudText = null;
  const ms = (v) => (Number.isFinite(v) ? v.toFixed(1) : "–");
  let lastOut = null;

  async function renderNelf(pose) {
    const t0 = performance.now();
    const result = await session.run({ [cfg.nelf.input]: new ort.Tensor("float32", pose, [4, 4]) });
    const t1 = performance.now();
    const out = result[cfg.nelf.output].data; // (1, 3, H, W)
    const n = W * H, px = image.data;
    for (let i = 0; i < n; i++) {
      px[4 * i] = out[i] * 255 + 0.5;
      px[4 * i + 1] = out[n + i] * 255 + 0.5;
      px[4 * i + 2] = out[2 * n + i] * 255 + 0.5;
      px[4 * i + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
    const t2 = performance.now();
    lastOut = out;
    b3d.lastPose = Array.from(pose);
    b3d.nelfCount++;
    const f = { ms: t2 - t0, infer: t1 - t0 };
    b3d.frames.push(f);
    if (b3d.frames.length > 2000) b3d.frames.shift();
    if (hudText) hud.textContent = hudText();
    return f;
  }

  // ---- splats: Spark on three.js (software or hardware WebGL2)
  const scene = new THREE.Scene();
  let splatsReady = false;
  let mesh = null;
  const params = new URLSearchParams(location.search);
  const lod = cfg.lod ? (b3d.lod = {
    levels: cfg.lod.levels, target: Number(params.get("lod_ms")) || cfg.lod.target_ms || 33,
    shown: -1, arrived: 0, received: 0, cap: cfg.lod.levels.length - 1, building: false,
    frameMs: null, swaps: [], times: [],
  }) : null;

  // the ladder's stream: one fetch; a level "arrives" once its byte prefix is in
  function streamLadder(onArrive) {
    return (async () => {
      const total = cfg.lod.total_bytes;
      const buf = (lod.buffer = new Uint8Array(total));
      const resp = await fetch(cfg.lod.file);
      if (!resp.ok) throw new Error(`${cfg.lod.file}: HTTP ${resp.status}`);
      const reader = resp.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (lod.received + value.length > total) throw new Error(`${cfg.lod.file} is longer than config.json says`);
        buf.set(value, lod.received);
        lod.received += value.length;
        while (lod.arrived < lod.levels.length && lod.levels[lod.arrived].bytes[1] <= lod.received) {
          lod.arrived++;
          onArrive();
        }
      }
      if (lod.arrived < lod.levels.length) throw new Error(`${cfg.lod.file} ended after ${lod.received} bytes`);
    })();
  }

  // show level k (0-based): a new SplatMesh from its byte prefix replaces the one drawn
  async function showLevel(SplatMesh, k) {
    lod.building = true;
    try {
      const m = new SplatMesh({ fileBytes: lod.buffer.slice(0, lod.levels[k].bytes[1]), fileType: "splat" });
      await m.initialized;
      scene.add(m);
      if (mesh) { scene.remove(mesh); mesh.dispose(); }
      mesh = m;
      lod.shown = k;
      lod.times = [];
      lod.frameMs = null; // this level's is measured afresh
      b3d.numSplats = m.numSplats ?? lod.levels[k].count;
      lod.swaps.push({ level: k + 1, count: lod.levels[k].count, t: performance.now() });
    } finally { lod.building = false; }
  }

  // after each splat frame: step up when the frame time allows and the bytes are in, down when it does not
  let SplatMeshClass = null;
  function governLadder(interval) {
    if (!lod || lod.shown < 0 || lod.building) return;
    lod.times.push(interval);
    const settle = 5; // the first frames after a swap upload and sort: not this level's frame time
    if (lod.times.length < settle + 20) return;
    const med = (lod.frameMs = median(lod.times.slice(-20)));
    const k = lod.shown;
    if (med > 1.15 * lod.target && k > 0) {
      lod.cap = k - 1;
      showLevel(SplatMeshClass, k - 1).catch(splatFail);
    } else if (k < lod.cap && k + 1 < lod.arrived && med <= 0.8 * lod.target) {
      showLevel(SplatMeshClass, k + 1).catch(splatFail);
    }
  }
  function splatFail(e) {
    b3d.splatError = String((e && e.message) || e);
    $("msg").textContent = `splats: ${b3d.splatError}`;
    $("msg").className = "error";
  }

  try {
    renderer = new THREE.WebGLRenderer({ canvas: splatCanvas, antialias: false, preserveDrawingBuffer: true });
    renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
    renderer.setClearColor(new THREE.Color().setRGB(bg[0], bg[1], bg[2], THREE.SRGBColorSpace), 1);
    layout();
    const { SparkRenderer, SplatMesh } = await import("@sparkjsdev/spark");
    scene.add(new SparkRenderer({ renderer }));
    if (lod) {
      // .splat holds the run's own axes (no flip); the stream goes on after the first level is shown
      SplatMeshClass = SplatMesh;
      let firstArrived;
      const first = new Promise((res) => { firstArrived = res; });
      lod.streaming = streamLadder(() => { if (lod.arrived === 1) firstArrived(); });
      lod.streaming.catch((e) => { splatFail(e); firstArrived(); });
      await first;
      if (lod.arrived < 1) throw new Error(b3d.splatError || "the ladder's first level did not arrive");
      await showLevel(SplatMesh, 0);
    } else {
      mesh = new SplatMesh({ url: cfg.splats.file });
      if (cfg.splats.flip_yz) mesh.quaternion.set(1, 0, 0, 0); // SPZ right-up-back -> the run's axes
      await mesh.initialized;
      scene.add(mesh);
      b3d.numSplats = mesh.numSplats ?? mesh.packedSplats?.numSplats ?? null;
    }
    splatsReady = true;
  } catch (e) {
    b3d.splatError = String((e && e.message) || e);
    $("btn-splats").disabled = true;
    $("msg").textContent = `splats unavailable: ${b3d.splatError}`;
    $("msg").className = "error";
  }

  // ---- the loop: NeLF frames only when the camera moved; splats every animation frame
  let dirty = true, busy = false, lastT = null;
  controls.addEventListener("change", () => { dirty = true; });
  hudText = function () {
    const recent = (xs, k) => xs.slice(-k);
    if (b3d.mode === "nelf") {
      const fr = recent(b3d.frames, 30);
      const native = cfg.nelf.native_ms_1thread;
      return `NeLF ${cfg.nelf.variant} ${W}×${H} · ${ms(median(fr.map((f) => f.ms)))} ms/frame` +
        ` (inference ${ms(median(fr.map((f) => f.infer)))})` +
        (native ? `\nnative onnxruntime, 1 thread, at export: ${native.toFixed(1)} ms` : "");
    }
    const line = `Splats (Spark) · ${ms(median(recent(b3d.splatTimes, 30)))} ms/frame`;
    if (!lod || lod.shown < 0) return line;
    const n = lod.levels.length;
    return line + `\nLOD ${lod.shown + 1}/${n} · ${lod.levels[lod.shown].count.toLocaleString("en-US")} splats` +
      (lod.arrived < n ? ` · loading ${lod.arrived}/${n}` : "") + ` · target ${ms(lod.target)} ms`;
  };
  function tick(t) {
    if (b3d.mode === "splats" && splatsReady) {
      renderer.render(scene, camera);
      b3d.splatCount++;
      if (lastT !== null) {
        b3d.splatTimes.push(t - lastT);
        governLadder(t - lastT);
      }
      if (b3d.splatTimes.length > 2000) b3d.splatTimes.shift();
      lastT = t;
    } else {
      lastT = null;
      if (dirty && !busy) {
        dirty = false;
        busy = true;
        renderNelf(c2wFromCamera(camera)).catch(fail).finally(() => { busy = false; });
      }
    }
    hud.textContent = hudText();
  }

  function setMode(mode) {
    if (mode === "splats" && !splatsReady) return b3d.mode;
    b3d.mode = mode;
    nelfCanvas.style.visibility = mode === "nelf" ? "visible" : "hidden";
    splatCanvas.style.visibility = mode === "splats" ? "visible" : "hidden";
    $("btn-nelf").setAttribute("aria-pressed", String(mode === "nelf"));
    $("btn-splats").setAttribute("aria-pressed", String(mode === "splats"));
    dirty = true;
    return mode;
  }
  $("btn-nelf").onclick = () => setMode("nelf");
  $("btn-splats").onclick = () => setMode("splats");
  $("btn-reset").onclick = () => { resetCamera(); dirty = true; };
  window.addEventListener("keydown", (e) => {
    if (e.key === "t" || e.key === "T") setMode(b3d.mode === "nelf" ? "splats" : "nelf");
  });

  // ---- hooks for tests and measurements (window.b3d)
  const waitFor = (cond) => new Promise((res) => {
    const poll = () => (cond() ? res() : setTimeout(poll, 5));
    poll();
  });
  Object.assign(b3d, {
    setMode,
    c2w: () => Array.from(c2wFromCamera(camera)),
    setPose(c2w) {
      setCameraFromC2W(camera, c2w);
      const d = new THREE.Vector3(c2w[0][2], c2w[1][2], c2w[2][2]).normalize();
      controls.target.copy(camera.position).addScaledVector(d, cam.depth);
      dirty = true;
    },
    reset() { resetCamera(); dirty = true; },
    // resolves once the NeLF has drawn the camera's current pose
    async nelfIdle() { await waitFor(() => !dirty && !busy); return b3d.nelfCount; },
    nelfPixels: () => (lastOut ? Array.from(lastOut) : null),
    // the splat canvas as a PNG data URL (the drawing buffer is preserved)
    splatPNG: () => splatCanvas.toDataURL("image/png"),
    // n back-to-back NeLF frames at the current pose: [{ms, infer}, ...]
    async bench(n) {
      await waitFor(() => !busy);
      busy = true;
      try {
        const pose = c2wFromCamera(camera), out = [];
        for (let i = 0; i < n; i++) out.push(await renderNelf(pose));
        return out;
      } finally { busy = false; }
    },
    // intervals between the next n splat frames (ms)
    async splatFrames(n) {
      const k = b3d.splatTimes.length;
      await waitFor(() => b3d.splatTimes.length >= k + n);
      return b3d.splatTimes.slice(k, k + n);
    },
  });

  const modeParam = params.get("mode");
  setMode(modeParam === "splats" ? "splats" : "nelf");
  b3d.warmupMs = (await renderNelf(c2wFromCamera(camera))).ms; // the first run allocates: not a frame time
  b3d.frames.length = 0;
  dirty = b3d.mode !== "nelf";
  renderer?.setAnimationLoop(tick);
  if (!renderer) (function raf(t) { tick(t); requestAnimationFrame(raf); })(performance.now());
  hud.textContent = hudText();
  b3d.state = "ready";
}

function fail(e) {
  b3d.state = "error";
  b3d.error = String((e && e.stack) || e);
  const msg = $("msg");
  msg.textContent = `error: ${(e && e.message) || e}`;
  msg.className = "error";
  $("hud").textContent = "error";
}

start().catch(fail);
