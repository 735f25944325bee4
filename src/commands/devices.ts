import type { Argv } from 'yargs';

import { formatBytes } from '../checkpoint/fsutil';
import { native } from '../native';

/** `devices`: what libtorch can use here. */
export function devicesCommand<T>(cli: Argv<T>): Argv<T> {
  return cli.command(
    'devices',
    'List the compute devices libtorch can use here',
    () => {},
    async () => {
      const v = native().version();
      console.log(`libtorch ${v.torch} (${v.cuda ? 'CUDA build' : 'CPU build'})`);
      for (const d of await native().devices()) {
        const name = d.type + (d.type === 'cuda' && d.available ? `:${d.index}` : '');
        const mem = d.totalMemory ? `, ${formatBytes(d.totalMemory)}` : '';
        console.log(d.available ? `  [OK]   ${name}: ${d.name ?? ''}${mem}${d.threads ? `, ${d.threads} threads` : ''}` : `  [--]   ${name}: ${d.reason}`);
      }
    },
  );
}
