// The status page's 3D viewer: one three.js canvas that shows a job's mesh (model.glb) or its
// Gaussian splats (splats.splat). Bundled with three.js and Spark into daemon/page/build/viewer.js
// by `npm ci --prefix web`, so the daemon serves it with no CDN.
//
// The page fetches the bytes itself (it may need a bearer token) and hands them over; the viewer
// reports what it is doing in container.dataset.state: loading, ready or error.
import { SparkRenderer, SplatFileType, SplatMesh } from "@sparkjsdev/spark";
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";

const BACKGROUND = 0x1d2127;

export class Viewer {
  constructor(container) {
    this.container = container;
    this.renderer = new THREE.WebGLRenderer({ antialias: true });
    this.renderer.setPixelRatio(Math.min(window.devicePixelRatio, 2));
    this.scene = new THREE.Scene();
    this.scene.background = new THREE.Color(BACKGROUND);
    this.camera = new THREE.PerspectiveCamera(45, 1, 0.01, 100);
    this.controls = new OrbitControls(this.camera, this.renderer.domElement);
    this.controls.addEventListener("change", () => this.draw()); // no damping: its tail is frames
    // Spark draws every SplatMesh in the scene through this one object; it asks for another frame
    // when its sort (done in a worker) or its splat set changes.
    this.spark = new SparkRenderer({ renderer: this.renderer, onDirty: () => this.draw() });
    this.scene.add(this.spark);
    this.scene.add(new THREE.HemisphereLight(0xffffff, 0x444444, 2.0));
    const headlight = new THREE.DirectionalLight(0xffffff, 1.5);
    this.camera.add(headlight);
    this.scene.add(this.camera);
    this.shown = null;
    container.replaceChildren(this.renderer.domElement);
    this.resize = new ResizeObserver(() => this.fit());
    this.resize.observe(container);
    this.frame = 0;
    this.fit();
  }

  // Draw on demand, not in a loop: a view nobody touches costs nothing. On a station without a GPU
  // (software WebGL) a continuous loop kept ~1.8 of 2 cores busy, taken from the running job.
  draw() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.controls.update();
      this.renderer.render(this.scene, this.camera);
    });
  }

  fit() {
    const width = Math.max(1, this.container.clientWidth);
    const height = Math.max(1, this.container.clientHeight);
    this.renderer.setSize(width, height);
    this.camera.aspect = width / height;
    this.camera.updateProjectionMatrix();
    this.draw();
  }

  // Load one of the job's outputs: kind "mesh" (GLB bytes) or "splats" (.splat bytes).
  async show(kind, bytes) {
    this.container.dataset.state = "loading";
    this.container.dataset.kind = kind;
    try {
      const object = kind === "mesh" ? await meshFrom(bytes) : await splatsFrom(bytes);
      this.replace(object);
      this.container.dataset.state = "ready";
    } catch (error) {
      this.container.dataset.state = "error";
      this.container.dataset.error = String(error?.message ?? error);
      throw error;
    }
  }

  replace(object, home = true) {
    this.clear();
    this.shown = object;
    this.scene.add(object);
    if (home) this.home();
    this.draw();
  }

  // A running job's model so far (a "model" message of the WebSocket): its points and a frustum per
  // placed photo. Each snapshot replaces the last; the view stays where the person turned it.
  showLive(model) {
    const first = this.container.dataset.kind !== "live";
    this.replace(liveObject(model), first);
    this.container.dataset.kind = "live";
    this.container.dataset.state = "ready";
    this.container.dataset.live = `${model.kind}:${model.cameras}:${model.points_total}`;
  }

  clear() {
    if (!this.shown) return;
    this.scene.remove(this.shown);
    this.shown.traverse?.((child) => child.geometry?.dispose?.());
    this.shown.dispose?.();
    this.shown = null;
  }

  // scandrop's world frame puts the scene at the origin with 90% of it within radius 1 (stray
  // points would spoil a bounding box): look at that sphere from above the front.
  home() {
    this.camera.position.set(0, 0.9, 2.45);
    this.controls.target.set(0, 0, 0);
    this.controls.update();
  }

  // Free everything now, not when the garbage collector gets to it: Spark's render targets and sort
  // worker, and the GL context itself. Left to the collector, a software-GL (SwiftShader) page
  // stopped drawing for seconds some time after the job view closed.
  dispose() {
    this.resize.disconnect();
    cancelAnimationFrame(this.frame);
    this.frame = -1; // no more frames, whatever asks
    this.clear();
    this.spark.dispose();
    this.controls.dispose();
    this.renderer.dispose();
    this.renderer.forceContextLoss();
    this.container.replaceChildren();
  }
}

const FRUSTUM_DEPTH = 0.08; // in scandrop's world frame the scene's radius is about 1

function decode(base64) {
  return Uint8Array.from(atob(base64), (c) => c.charCodeAt(0)).buffer;
}

function liveObject(model) {
  const group = new THREE.Group();
  const positions = new Float32Array(decode(model.points));
  const colors = new Uint8Array(decode(model.colors));
  if (positions.length) {
    const geometry = new THREE.BufferGeometry();
    geometry.setAttribute("position", new THREE.BufferAttribute(positions, 3));
    geometry.setAttribute("color", new THREE.BufferAttribute(colors, 3, true));
    const size = model.kind === "dense" ? 0.012 : 0.02;
    group.add(new THREE.Points(geometry, new THREE.PointsMaterial({ size, vertexColors: true })));
  }
  // Per camera: centre xyz, camera-to-world quaternion xyzw (x right, y down, z forward), tan half fov x, y.
  const cams = new Float32Array(decode(model.camera_data));
  const lines = [];
  const q = new THREE.Quaternion();
  for (let i = 0; i + 9 <= cams.length; i += 9) {
    const centre = new THREE.Vector3(cams[i], cams[i + 1], cams[i + 2]);
    q.set(cams[i + 3], cams[i + 4], cams[i + 5], cams[i + 6]);
    const corners = [[-1, -1], [1, -1], [1, 1], [-1, 1]].map(([sx, sy]) =>
      new THREE.Vector3(sx * cams[i + 7], sy * cams[i + 8], 1).multiplyScalar(FRUSTUM_DEPTH).applyQuaternion(q).add(centre));
    for (let k = 0; k < 4; k++) lines.push(centre, corners[k], corners[k], corners[(k + 1) % 4]);
  }
  if (lines.length) {
    const geometry = new THREE.BufferGeometry().setFromPoints(lines);
    group.add(new THREE.LineSegments(geometry, new THREE.LineBasicMaterial({ color: 0xffb000 })));
  }
  return group;
}

async function meshFrom(bytes) {
  const gltf = await new GLTFLoader().parseAsync(bytes, "");
  return gltf.scene;
}

async function splatsFrom(bytes) {
  const splats = new SplatMesh({ fileBytes: bytes, fileType: SplatFileType.SPLAT });
  await splats.initialized;
  if (splats.packedSplats?.numSplats === 0) throw new Error("the splat file holds no splats");
  return splats;
}
