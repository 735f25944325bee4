/**
 * `npm ci` installs exactly package-lock.json and refuses to run when it is out of sync with package.json (a dependency
 * added to package.json only, or a package whose dependencies, optional platform packages included, have no entry in
 * the lock: "Missing: @img/sharp-darwin-arm64 from lock file"). This checks the same rules without the network, so a
 * commit that breaks `npm ci` fails `npm test`. Fix a failure with `npm install` and commit package-lock.json.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

// semver is what npm itself uses to match ranges (a dependency of ts-jest and jest, so always installed with them).
// eslint-disable-next-line @typescript-eslint/no-require-imports
const semver = require('semver') as { satisfies(v: string, range: string, o?: { includePrerelease?: boolean }): boolean; validRange(r: string): string | null };

type Deps = Record<string, string>;
interface LockPackage {
  version?: string;
  link?: boolean;
  dependencies?: Deps;
  optionalDependencies?: Deps;
  devDependencies?: Deps;
  peerDependencies?: Deps;
  peerDependenciesMeta?: Record<string, { optional?: boolean }>;
}
interface Lock {
  name?: string;
  version?: string;
  lockfileVersion?: number;
  packages?: Record<string, LockPackage>;
}
interface PackageJson {
  name: string;
  version: string;
  dependencies?: Deps;
  devDependencies?: Deps;
  optionalDependencies?: Deps;
  peerDependencies?: Deps;
}

/** Where node's resolution finds `name` from the package at lock key `from` ('' is the root), or undefined. */
function resolveInLock(packages: Record<string, LockPackage>, from: string, name: string): string | undefined {
  let dir = from;
  for (;;) {
    const key = dir ? `${dir}/node_modules/${name}` : `node_modules/${name}`;
    if (packages[key]) return key;
    if (!dir) return undefined;
    const i = dir.lastIndexOf('/node_modules/');
    dir = i < 0 ? '' : dir.slice(0, i);
  }
}

/** What `npm ci` would complain about, one line each (empty: in sync). */
function lockProblems(pkg: PackageJson, lock: Lock): string[] {
  const problems: string[] = [];
  if ((lock.lockfileVersion ?? 1) < 2) return [`lockfileVersion ${lock.lockfileVersion} has no "packages" section (npm >= 7 writes version 3)`];
  const packages = lock.packages ?? {};
  const root = packages[''] ?? {};
  if (lock.name !== pkg.name) problems.push(`lock name ${lock.name} != package.json name ${pkg.name}`);
  for (const field of ['dependencies', 'devDependencies', 'optionalDependencies', 'peerDependencies'] as const) {
    const want = pkg[field] ?? {};
    const have = root[field] ?? {};
    for (const [n, r] of Object.entries(want)) if (have[n] !== r) problems.push(`package.json ${field} ${n}@${r}: the lock has ${have[n] ? `${n}@${have[n]}` : 'no entry'}`);
    for (const n of Object.keys(have)) if (!(n in want)) problems.push(`the lock's root ${field} has ${n}, package.json does not`);
  }
  for (const [key, p] of Object.entries(packages)) {
    if (p.link) continue;
    // The root's requirements are package.json's own (npm ci installs from package.json's ranges).
    const src: LockPackage = key === '' ? pkg : p;
    const required: Array<[string, string]> = [...Object.entries(src.dependencies ?? {}), ...Object.entries(src.optionalDependencies ?? {})];
    if (key === '') required.push(...Object.entries(src.devDependencies ?? {}));
    for (const [n, r] of Object.entries(p.peerDependencies ?? {})) if (!p.peerDependenciesMeta?.[n]?.optional) required.push([n, r]);
    for (const [n, range] of required) {
      const at = resolveInLock(packages, key, n);
      const who = key || 'package.json';
      if (!at) {
        problems.push(`Missing: ${n}@${range} from lock file (needed by ${who})`);
        continue;
      }
      const v = packages[at].version;
      if (v && semver.validRange(range) && !semver.satisfies(v, range, { includePrerelease: true }))
        problems.push(`Invalid: lock file's ${n}@${v} (${at}) does not satisfy ${n}@${range} (needed by ${who})`);
    }
  }
  return problems;
}

const root = path.join(__dirname, '..');
const read = <T>(f: string): T => JSON.parse(fs.readFileSync(path.join(root, f), 'utf8')) as T;

test('package-lock.json is in sync with package.json, every dependency (optional platform packages too) has a matching entry (npm ci would install it)', () => {
  expect(lockProblems(read<PackageJson>('package.json'), read<Lock>('package-lock.json'))).toEqual([]);
});

test('the check finds what npm ci refuses: a dependency only in package.json, a missing optional platform package, a version outside the range', () => {
  const pkg: PackageJson = { name: 'x', version: '1.0.0', dependencies: { a: '^1.0.0', b: '^2.0.0' } };
  const lock: Lock = {
    name: 'x',
    lockfileVersion: 3,
    packages: {
      '': { dependencies: { a: '^1.0.0' } },
      'node_modules/a': { version: '1.2.0', optionalDependencies: { 'a-linux-x64': '1.2.0', 'a-darwin-arm64': '1.2.0' }, dependencies: { c: '^3.0.0' } },
      'node_modules/a-linux-x64': { version: '1.2.0' },
      'node_modules/a/node_modules/c': { version: '3.1.0' },
      'node_modules/c': { version: '2.0.0' },
    },
  };
  expect(lockProblems(pkg, lock)).toEqual([
    "package.json dependencies b@^2.0.0: the lock has no entry",
    'Missing: b@^2.0.0 from lock file (needed by package.json)',
    'Missing: a-darwin-arm64@1.2.0 from lock file (needed by node_modules/a)',
  ]);
  lock.packages!['node_modules/a/node_modules/c'].version = '4.0.0';
  expect(lockProblems({ ...pkg, dependencies: { a: '^1.0.0' } }, lock)).toContain(
    "Invalid: lock file's c@4.0.0 (node_modules/a/node_modules/c) does not satisfy c@^3.0.0 (needed by node_modules/a)",
  );
});
