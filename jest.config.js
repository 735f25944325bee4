// Jest gives each test file its own copy of process.env, so src/native.ts cannot set OMP_WAIT_POLICY for libgomp
// inside a worker. Set it here, in the parent: the workers inherit it before they load libtorch. (Spin-waiting OpenMP
// threads of two workers on 2 cores made training steps 20x slower.)
process.env.OMP_WAIT_POLICY = process.env.OMP_WAIT_POLICY || 'PASSIVE';

/** @type {import('jest').Config} */
module.exports = {
  preset: 'ts-jest',
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  testTimeout: 300000,
  // torch work is serialized on one native thread per process; two workers fit 2 cores.
  maxWorkers: 2,
  transform: { '^.+\\.ts$': ['ts-jest', { tsconfig: 'test/tsconfig.json' }] },
};
