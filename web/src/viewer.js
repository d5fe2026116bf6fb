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

  replace(object) {
    this.clear();
    this.shown = object;
    this.scene.add(object);
    this.home();
    this.draw();
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
