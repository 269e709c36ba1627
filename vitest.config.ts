import { defineConfig } from "vitest/config";

// Two projects: "cpu" runs everywhere (CI included); "gpu" needs an NVIDIA GPU and runs
// on the GPU machine (`npm run test:gpu`).
export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: "cpu",
          include: ["src/**/*.test.ts", "test/**/*.test.ts"],
          exclude: ["test/gpu/**", "node_modules/**"],
          testTimeout: 120_000,
          hookTimeout: 120_000,
          pool: "forks",
        },
      },
      {
        test: {
          name: "gpu",
          include: ["test/gpu/**/*.test.ts"],
          testTimeout: 600_000,
          hookTimeout: 600_000,
          pool: "forks",
          maxWorkers: 1,
        },
      },
    ],
  },
});
