// The live page: GET / (the HTML) and GET /ui/{file} (its compiled script
// and its stylesheet), served from dist/ui/ as `npm run build` leaves it
// (sources in src/ui/). No token: the page asks for the admin token and
// sends it in a header. The HTML says whether the admin API is enabled, so
// that without ADMIN_TOKEN the page says so instead of asking for a token.

import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { HttpError } from '../errors.js';
import { errors, HEADERS_TOO_LARGE } from '../schemas.js';

// dist/ui/ from dist/routes/ui.js, and from src/routes/ui.ts alike (tests run the sources).
export const UI_DIR = fileURLToPath(new URL('../../dist/ui/', import.meta.url));

const CONTENT_TYPES: Record<string, string> = {
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
};
/** A file of dist/ui/ by its bare name: no directories, so nothing outside it. */
const ASSET_NAME = /^[\w-]+\.(?:js|css)$/;

const HEADERS = {
  'cache-control': 'no-cache',
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
};
// The page's scripts and styles are its own files; it talks to this service only.
const CONTENT_SECURITY_POLICY =
  "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; " +
  "base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const NOT_BUILT = 'The page is not built: `npm run build` writes dist/ui/.';

async function readUiFile(name: string): Promise<string> {
  try {
    return await readFile(path.join(UI_DIR, name), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new HttpError(404, name === 'index.html' ? 'the page is not built: run npm run build' : `no file ${name}`);
    }
    throw err;
  }
}

export const uiRoutes: FastifyPluginAsyncTypebox<{ adminEnabled: boolean }> = async (app, { adminEnabled }) => {
  app.get(
    '/',
    {
      schema: {
        tags: ['operations'],
        summary: 'The live page',
        description:
          'A page that shows every agent with its metadata, live (it reads `GET /v1/agents` and ' +
          '`POST /v1/agents/metadata/watch` with the admin token, which it asks for). No token.',
        response: {
          200: {
            description: 'The page.',
            content: { 'text/html': { schema: Type.String({ description: 'HTML.' }) } },
          },
          ...errors({ 404: NOT_BUILT, 431: HEADERS_TOO_LARGE }),
        },
      },
    },
    async (_request, reply) => {
      const html = (await readUiFile('index.html')).replace(
        'data-admin="unknown"',
        `data-admin="${adminEnabled ? 'enabled' : 'disabled'}"`,
      );
      return reply
        .headers({ ...HEADERS, 'content-security-policy': CONTENT_SECURITY_POLICY })
        .type('text/html; charset=utf-8')
        .send(html);
    },
  );

  app.get(
    '/ui/:file',
    {
      schema: {
        tags: ['operations'],
        summary: 'A file of the live page',
        description: 'The page’s script modules (`page.js`, …) and its stylesheet (`style.css`). No token.',
        params: Type.Object({
          file: Type.String({ description: 'A file name of the page, such as `page.js` or `style.css`.' }),
        }),
        response: {
          200: {
            description: 'The file.',
            content: {
              'text/javascript': { schema: Type.String({ description: 'A JavaScript module.' }) },
              'text/css': { schema: Type.String({ description: 'A stylesheet.' }) },
            },
          },
          ...errors({ 404: `No such file of the page. ${NOT_BUILT}`, 431: HEADERS_TOO_LARGE }),
        },
      },
    },
    async (request, reply) => {
      const { file } = request.params;
      if (!ASSET_NAME.test(file)) throw new HttpError(404, `no file ${file}`);
      const body = await readUiFile(file);
      return reply.headers(HEADERS).type(CONTENT_TYPES[path.extname(file)]!).send(body);
    },
  );
};
